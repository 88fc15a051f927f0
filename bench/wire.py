"""Benchmark: a 1 MB slot on the wire of one process, CPU per operation, beside redis-py doing the same.

    .venv/bin/python bench/wire.py [--size 1048576] [--number 40]

What the pump pays to append a large slot with its worker's inputs (`buffer_append_at`: the append
script + SET EX, one round trip) and what a worker pays to read it back (`buffer_get_slot`), on a
pooled connection and on the worker's DirectConnection. Baselines (same run, same server, same
bytes): redis-py storing the slot and the value without the script (a pipeline of RPUSH + SET EX),
and redis-py's LINDEX. Thread CPU per call, best of 5 repeats (other load on the machine distorts it
little); run it on two trees (PYTHONPATH set to another tree's `library`) to compare code versions.
Starts its own redis-server on a free port. Not a test: nothing asserts on speed.
"""
from __future__ import annotations

import argparse
import os
import secrets
import time
from collections.abc import Callable
from typing import Any

from xml_pipeline.memory import BackendConfig, get_shared_backend

from benchkit import BenchRedis  # noqa: E402  (bench/ is the script directory)


def cpu_ms(fn: Callable[[int], Any], number: int) -> float:
    """Thread CPU per call in ms, best of 5 repeats; `fn` gets a call number unique in the run."""
    best, n = float("inf"), 0
    for _ in range(5):
        start = time.thread_time()
        for _ in range(number):
            fn(n)
            n += 1
        best = min(best, (time.thread_time() - start) / number)
    return best * 1e3


def row(what: str, ours: float, base_what: str, base: float) -> None:
    print(f"| {what} | {ours:.3f} ms | {base_what} | {base:.3f} ms | {base / ours:.2f}x |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=1 << 20, help="slot size in bytes (default 1 MiB)")
    ap.add_argument("--number", type=int, default=40, help="calls per repeat")
    args = ap.parse_args()
    server = BenchRedis(name="wire")
    backend: Any = get_shared_backend(BackendConfig(backend_type="redis", redis_url=server.url, signing_key=secrets.token_hex(16),
                                                    redis_prefix=f"bw{secrets.token_hex(4)}:", redis_ttl=600))
    try:
        slot, ref = os.urandom(args.size), os.urandom(120)
        raw = backend.client
        print(f"# bench/wire.py  {args.size} B  load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
        print("| operation | ours (CPU) | baseline | baseline (CPU) | ratio |")
        print("| --- | ---: | --- | ---: | ---: |")
        backend.buffer_append("warm", slot)  # scripts loaded

        def raw_store(n: int) -> None:
            pipe = raw.pipeline(transaction=False)
            pipe.rpush(backend.keys.buffer(f"r{n}"), slot)
            pipe.set(backend.keys.tmp(f"rk{n}"), ref, ex=600)
            pipe.execute()

        def raw_read(_n: int) -> None:
            raw.lindex(backend.keys.buffer("warm"), 0)

        base_store = cpu_ms(raw_store, args.number)
        base_read = cpu_ms(raw_read, args.number)
        row("buffer_append_at (slot + one temp value), pooled connection",
            cpu_ms(lambda n: backend.buffer_append_at(f"p{n}", slot, 0, items=[(f"pk{n}", ref)]), args.number),
            "redis-py pipeline RPUSH + SET EX", base_store)
        row("buffer_get_slot, pooled connection", cpu_ms(lambda _n: backend.buffer_get_slot("warm", 0), args.number),
            "redis-py LINDEX", base_read)
        backend.use_direct_connection()  # what a worker process does
        row("buffer_append_at (slot + one temp value), direct connection",
            cpu_ms(lambda n: backend.buffer_append_at(f"d{n}", slot, 0, items=[(f"dk{n}", ref)]), args.number),
            "redis-py pipeline RPUSH + SET EX", base_store)
        row("buffer_get_slot, direct connection", cpu_ms(lambda _n: backend.buffer_get_slot("warm", 0), args.number),
            "redis-py LINDEX", base_read)
    finally:
        backend.buffer_clear()
        backend.close()
        server.stop()


if __name__ == "__main__":
    main()
