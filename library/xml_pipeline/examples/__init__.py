"""Example handlers shipped with the library, so pump and worker pods can run the demo organism.

- `greeter.handle` — a plain listener (runs in the pump): greets, and can call the `primes`
  listener to add a lucky number, which shows a call chain ("console.greeter.primes") and the
  response travelling back along it.
- `cpu.count_primes` — a cpu_bound listener that really burns CPU (trial division).
- `cpu.burn` — hashing rounds over the payload: the benchmark's unit of work.
"""
