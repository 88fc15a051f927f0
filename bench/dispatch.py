"""Benchmark: cpu_bound round trips through the pump, against a plain ProcessPoolExecutor, in one run.

    .venv/bin/python bench/dispatch.py [--workers 2] [--rounds 3] [--quick]

A round trip is the whole path of one cpu_bound message: the StreamPump takes a message from
outside, registers its thread, appends it to the ContextBuffer, hands a WorkerTask carrying the
message to a worker process (over a local worker's own pipe; to a worker pod sealed — signed for the
task — in the tasks stream entry, a payload over 64 KiB as a sealed reference to its slot, which the
worker reads instead of a copy), the worker runs the handler and answers with the response (over
the pipe; sealed in its result entry); the pump routes the reply and appends it to the ContextBuffer. Every message in flight at once (a window of
256), so the figure is throughput.

Paths measured (each with `--workers` worker processes):
- manager      ManagerBackend + local process pool (the `xml-pipeline run` / `make demo` path)
- redis-local  RedisBackend + local process pool
- redis-stream RedisBackend + Redis Streams to `xml-pipeline worker`-style consumers (the cluster path)
- baseline     the same handler function through concurrent.futures.ProcessPoolExecutor (payload
               pickled into the call, result pickled back; no backend, no buffer, no routing)

Handler: xml_pipeline.examples.cpu:burn (SHA-256 rounds over the payload). Work levels: 0 rounds
(pure dispatch overhead), 2,000 rounds (about 1 ms of CPU), 4,000 (about 2 ms: issue 12's "~2 ms
handler"; 100 B only) and 20,000 (about 10 ms; 100 B only).
Payloads: 100 B and 1 MB. Besides throughput, the CPU per round trip summed over every process
involved (pump, workers, manager server / redis-server; from /proc) — the figure that other load on
the machine does not distort.
Starts its own redis-server on a free port. Not a test: nothing asserts on speed.
"""
from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import multiprocessing
import os
import platform
import secrets
import statistics
import threading
import time
from typing import Any

from xml_pipeline.examples.cpu import burn
from xml_pipeline.memory import BackendConfig, get_shared_backend
from xml_pipeline.message_bus.dispatcher import RedisDispatcher
from xml_pipeline.message_bus.worker import DistributedWorker
from xml_pipeline.message_bus.local_pool import LocalWorkerPool
from xml_pipeline.message_bus.message import Message
from xml_pipeline.message_bus.stream_pump import StreamPump, run_messages
from xml_pipeline.organism import parse_organism

from benchkit import CPU_ORGANISM as ORGANISM, BenchRedis, cpu_seconds  # noqa: E402  (bench/ is the script directory)

SIGNING_KEY = secrets.token_hex(16)


def payload(size: int, rounds: int) -> str:
    head = f'<work rounds="{rounds}">'
    tail = "</work>"
    return head + "x" * max(0, size - len(head) - len(tail)) + tail


def plain_call(fragment: str) -> str:
    """The baseline's task: the same handler on the same message, nothing else."""
    return burn(Message(sender="console", to="work", payload=fragment))


# -- redis-server ---------------------------------------------------------------------------------
def _stream_worker(config: BackendConfig, workers: int, stop: Any) -> None:
    """A distributed worker process (what `xml-pipeline worker` runs), stopped through an Event."""
    org = parse_organism(ORGANISM % workers, environ={})
    backend = get_shared_backend(config)
    worker = DistributedWorker(backend, org)
    threading.Thread(target=lambda: (stop.wait(), worker.request_stop()), daemon=True).start()
    worker.run()
    backend.close()


# -- measurements -----------------------------------------------------------------------------------
Sample = tuple[float, float]  # (round trips per second, CPU seconds per round trip over all processes)


#: CPU per round trip of each kind of process, per (case, path): the rounds' readings (--per-process).
PARTS: dict[tuple[str, str], list[dict[str, float]]] = {}


async def pump_rate(backend: Any, dispatcher: Any, workers: int, fragment: str, count: int,
                    server_pids: list[int], worker_pids: list[int] | None = None, part: tuple[str, str] = ("", "")
                    ) -> Sample:
    org = parse_organism(ORGANISM % workers, environ={})
    async with StreamPump(org, backend, dispatcher=dispatcher, keep_outputs=False) as pump:
        # Warm up: workers started, imports done, connections open.
        await run_messages(pump, [Message("console", "work", fragment) for _ in range(workers * 4)])
        groups = {"pump": [os.getpid()], "workers": worker_pids or list(getattr(dispatcher, "pids", [])),
                  "server": server_pids}
        messages = [Message("console", "work", fragment) for _ in range(count)]
        cpu0 = {k: cpu_seconds(*v) for k, v in groups.items()}
        elapsed = await run_messages(pump, messages)
        cpu = {k: (cpu_seconds(*v) - cpu0[k]) / count for k, v in groups.items()}
    PARTS.setdefault(part, []).append(cpu)
    return count / elapsed, sum(cpu.values())


def plain_rate(pool: concurrent.futures.ProcessPoolExecutor, fragment: str, count: int) -> Sample:
    list(pool.map(plain_call, [fragment] * 8))  # warm up
    pids = [os.getpid(), *(p.pid for p in pool._processes.values())]  # noqa: SLF001 - bench only
    cpu0 = cpu_seconds(*pids)
    start = time.perf_counter()
    futures = [pool.submit(plain_call, fragment) for _ in range(count)]
    for f in futures:
        f.result()
    elapsed = time.perf_counter() - start
    return count / elapsed, (cpu_seconds(*pids) - cpu0) / count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    ap.add_argument("--rounds", type=int, default=3, help="repetitions per figure; the median is shown")
    ap.add_argument("--quick", action="store_true", help="fewer messages (a smoke run)")
    ap.add_argument("--per-process", action="store_true",
                    help="also print the CPU per round trip of the pump, the workers and the server apart")
    args = ap.parse_args()
    ctx = multiprocessing.get_context("spawn")
    workers = args.workers
    small_n = 300 if args.quick else 1500
    big_n = 20 if args.quick else 80
    cases = [("100 B", 100, 0, small_n), ("100 B", 100, 2000, small_n), ("100 B", 100, 4000, small_n // 2),
             ("100 B", 100, 20000, small_n // 5),
             ("1 MB", 1 << 20, 0, big_n), ("1 MB", 1 << 20, 2000, big_n)]

    print(f"# bench/dispatch.py  workers={workers} rounds={args.rounds}  python {platform.python_version()}  "
          f"{os.cpu_count()} cpu(s)  {platform.machine()}")
    print(f"# load average at start: {' '.join(f'{x:.1f}' for x in os.getloadavg())} "
          "(other processes on the machine slow every path; the ratios suffer less than the rates)")
    print("# rates in round trips per second (median of rounds, paths interleaved round by round);")
    print("# ratio = path / plain ProcessPoolExecutor")
    for rounds in sorted({c[2] for c in cases}):
        frag = payload(100, rounds)
        t = time.perf_counter()
        for _ in range(50):
            plain_call(frag)
        print(f"# handler cost with {rounds} rounds: {(time.perf_counter() - t) / 50 * 1000:.2f} ms per call (100 B)")
    redis_server = BenchRedis(name="dispatch")
    manager = get_shared_backend(BackendConfig(backend_type="manager", signing_key=SIGNING_KEY))
    rows: list[tuple[str, str, int, dict[str, float], dict[str, float]]] = []
    try:
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as plain:
            for label, size, rounds, count in cases:
                frag = payload(size, rounds)
                prefix = f"bench:{secrets.token_hex(4)}:"
                rcfg = BackendConfig(backend_type="redis", redis_url=redis_server.url, redis_prefix=prefix,
                                     signing_key=SIGNING_KEY, redis_ttl=3600)
                rb = get_shared_backend(rcfg)

                case = f"{label}, {rounds} rounds"

                async def local(backend: Any, server: list[int], path: str) -> Sample:
                    pool = LocalWorkerPool(backend, workers=workers, start_method="spawn")
                    return await pump_rate(backend, pool, workers, frag, count, server, part=(case, path))

                stop = ctx.Event()
                procs = [ctx.Process(target=_stream_worker, args=(rcfg, workers, stop)) for _ in range(workers)]
                for p in procs:
                    p.start()
                server_pids = {"manager": [int(manager.info()["server_pid"])], "redis": [redis_server.proc.pid]}
                samples: dict[str, list[Sample]] = {"baseline": [], "manager": [], "redis-local": [],
                                                    "redis-stream": []}
                try:
                    # Interleaved: a burst of load from other processes hits every path alike.
                    for _ in range(args.rounds):
                        samples["baseline"].append(plain_rate(plain, frag, count))
                        samples["manager"].append(asyncio.run(local(manager, server_pids["manager"], "manager")))
                        samples["redis-local"].append(asyncio.run(local(rb, server_pids["redis"], "redis-local")))
                        samples["redis-stream"].append(asyncio.run(pump_rate(
                            rb, RedisDispatcher(rb), workers, frag, count, server_pids["redis"],
                            [p.pid for p in procs if p.pid], part=(case, "redis-stream"))))
                finally:
                    stop.set()
                    for p in procs:
                        p.join(10)
                rates = {k: statistics.median(r for r, _ in v) for k, v in samples.items()}
                cpus = {k: statistics.median(c for _, c in v) for k, v in samples.items()}
                rb.buffer_clear()
                rb.registry_clear()
                rb.close()
                manager.buffer_clear()
                manager.registry_clear()
                rows.append((label, f"{rounds} rounds", count, rates, cpus))
                base, base_cpu = rates["baseline"], cpus["baseline"]
                print(f"{label:>6} {rounds:>5} rounds ({count} msgs): plain pool {base:7.1f}/s "
                      f"{base_cpu * 1000:5.2f} ms cpu | "
                      + " | ".join(f"{k} {v:7.1f}/s ({v / base:.2f}x) {cpus[k] * 1000:5.2f} ms cpu "
                                   f"({base_cpu / cpus[k]:.2f}x)" for k, v in rates.items() if k != "baseline"),
                      flush=True)
    finally:
        manager.close()
        redis_server.stop()
    print(f"# load average at end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")

    print()
    print("Round trips per second (ratio to the plain pool), and CPU per round trip summed over every process")
    print("involved (pump, workers, manager server or redis-server; ratio = plain pool's CPU / ours):")
    print()
    print("| payload | handler work | plain ProcessPoolExecutor | manager + local pool | redis + local pool | redis + streams |")
    print("| --- | --- | --- | --- | --- | --- |")
    for label, work, _count, r, c in rows:
        b, bc = r["baseline"], c["baseline"]
        cells = " | ".join(f"{r[k]:.0f}/s ({r[k] / b:.2f}×), {c[k] * 1000:.2f} ms CPU ({bc / c[k]:.2f}×)"
                           for k in ("manager", "redis-local", "redis-stream"))
        print(f"| {label} | {work} | {b:.0f}/s, {bc * 1000:.2f} ms CPU | {cells} |")
    if args.per_process:
        print()
        print("CPU per round trip by process (median of rounds): pump / workers / manager server or redis-server")
        print()
        print("| case | manager + local pool | redis + local pool | redis + streams |")
        print("| --- | --- | --- | --- |")
        for label, work, _count, _r, _c in rows:
            case = f"{label}, {work}"
            cells = " | ".join(" / ".join(f"{statistics.median(p[k] for p in PARTS[(case, path)]) * 1000:.2f}"
                                          for k in ("pump", "workers", "server")) + " ms"
                               for path in ("manager", "redis-local", "redis-stream"))
            print(f"| {case} | {cells} |")


if __name__ == "__main__":
    main()
