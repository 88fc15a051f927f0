"""Benchmark: a Redis Cluster of 1 master against one of 3 masters, in one run, several producers.

    .venv/bin/python bench/cluster.py [--producers 4] [--seconds 3] [--rounds 3] [--quick]

Both clusters are local (tests/redis_cluster.py: loopback, no replicas, so the comparison is masters
only), started side by side and measured round by round, interleaved. Per cluster:

- append     `--producers` processes, each a RedisClusterBackend + ContextBuffer appending signed
             slots to 64 threads of its own (spread over the slots) for `--seconds`: appends/s summed;
- raw RPUSH  the same processes sending plain RPUSH of the same size through redis-py's RedisCluster
             (no script, no signing, no index): the baseline of the same run;
- dispatch   `--producers` processes, each a StreamPump with an in-process handler (no worker
             processes) running conversations to the end: registry, append of the message, the
             handler, append of the answer; conversations/s summed. Once with the pump's fast path
             (group commit through one RedisPipe per master, memory/redis_cluster_pipe.py) and once
             with `pipelined=False` (every step a blocking redis-py cluster call in the io threads);
- store      the pump's own append path alone: `--producers` processes, each a RedisStore appending
             from 64 coroutines (one thread each) for `--seconds`, with the fast path and without;
             appends/s summed; beside each rate, the producers' CPU time per operation (all their
             threads), which a busy machine does not inflate as it does the rates.
- WAIT       on a third cluster, 3 masters + 3 replicas: the same appends with
             `redis_wait_replicas` 0 and 1 (the cost of durability across a failover).

Printed: each rate, ours / raw for appends, fast path / blocking path for dispatch and store
appends (beside the raw RPUSH baseline of the same run), and the scaling 3 masters / 1 master. Not a test:
nothing asserts on speed. docs/performance.md explains what the ratio means on this machine and
what it would be with a master per machine.
"""
from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import platform
import secrets
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from redis_cluster import LocalCluster, start_cluster  # noqa: E402

from xml_pipeline.memory import BackendConfig, ContextBuffer  # noqa: E402
from xml_pipeline.memory.redis_backend import RedisBackend  # noqa: E402

SIGNING_KEY = secrets.token_hex(16)
ORGANISM = """
organism: {name: bench}
listeners:
  - {name: echo, handler: "cluster:echo"}
"""
THREADS_PER_PRODUCER = 64


def echo(message: Any) -> str:
    """The dispatch bench's handler: answers at once (the store is what is measured)."""
    return "<ok/>"


def _config(url: str, prefix: str) -> BackendConfig:
    return BackendConfig(backend_type="redis", redis_url=url, redis_prefix=prefix, redis_ttl=600,
                         signing_key=SIGNING_KEY)


def _append_producer(url: str, prefix: str, seconds: float, start_at: float, raw: bool, wait: int = 0) -> int:
    backend = RedisBackend(_config(url, prefix).replace(redis_wait_replicas=wait))
    buffer = ContextBuffer(backend)
    tids = [f"{os.getpid()}-{j}" for j in range(THREADS_PER_PRODUCER)]
    blob = b"x" * 200
    client = backend.client
    # Warm: the slot map, the scripts on every master, the connections.
    for t in tids:
        buffer.append(t, {"n": 0}, "a", "b")
    while time.time() < start_at:
        time.sleep(0.001)
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        t = tids[n % THREADS_PER_PRODUCER]
        if raw:
            client.rpush(f"{prefix}raw:{{{t}}}", blob)
        else:
            buffer.append(t, {"n": n}, "a", "b")
        n += 1
    backend.close()
    return n


def _store_producer(url: str, prefix: str, seconds: float, start_at: float, pipelined: bool) -> tuple[int, float]:
    from xml_pipeline.memory.async_store import open_store

    async def run() -> tuple[int, float]:
        backend = RedisBackend(_config(url, prefix))
        store = open_store(backend, pipelined=pipelined)
        buffer = ContextBuffer(backend)
        tids = [f"{os.getpid()}-{j}" for j in range(THREADS_PER_PRODUCER)]
        payload = "x" * 200
        # Warm: the slot map, the scripts on every master, the connections.
        await asyncio.gather(*(store.append(buffer, buffer.prepare(t, payload, "a", "b", append_id=f"w-{t}"))
                               for t in tids))
        while time.time() < start_at:
            await asyncio.sleep(0.001)
        end = time.monotonic() + seconds
        cpu = time.process_time()  # every thread of this process: the loop's and the io threads'
        counts = [0] * len(tids)

        async def writer(j: int) -> None:
            t = tids[j]
            while time.monotonic() < end:
                await store.append(buffer, buffer.prepare(t, payload, "a", "b", append_id=f"{t}-{counts[j]}"))
                counts[j] += 1

        await asyncio.gather(*(writer(j) for j in range(len(tids))))
        cpu = time.process_time() - cpu
        store.close()
        backend.close()
        return sum(counts), cpu

    return asyncio.run(run())


def _dispatch_producer(url: str, prefix: str, count: int, start_at: float,
                       pipelined: bool = True) -> tuple[float, float]:
    from xml_pipeline.message_bus.message import Message
    from xml_pipeline.message_bus.stream_pump import StreamPump, run_messages
    from xml_pipeline.organism import parse_organism

    async def run() -> tuple[float, float]:
        org = parse_organism(ORGANISM, environ={})
        backend = RedisBackend(_config(url, prefix))
        async with StreamPump(org, backend, keep_outputs=False, pipelined=pipelined) as pump:
            await run_messages(pump, [Message(f"s{i}", "echo", "<m/>") for i in range(32)])
            while time.time() < start_at:
                await asyncio.sleep(0.001)
            # A sender per conversation: each is its own thread, spread over the slots.
            cpu = time.process_time()
            elapsed = await run_messages(pump, [Message(f"c{os.getpid()}-{i}", "echo", "<m/>")
                                                for i in range(count)])
            cpu = time.process_time() - cpu
        backend.close()
        return count / elapsed, cpu / count

    return asyncio.run(run())


def measure(pool: Any, kind: str, url: str, producers: int, seconds: float, dispatch_n: int,
            cpu: list[float] | None = None) -> float:
    """The rate of `kind` summed over the producers; for store and dispatch kinds also the
    producers' CPU time per operation (µs, every thread of the process) appended to `cpu`."""
    prefix = f"bench{secrets.token_hex(3)}:"
    start_at = time.time() + 1.5  # every producer warmed and waiting
    if kind in ("dispatch", "dispatch-blocking"):
        out = pool.starmap(_dispatch_producer, [(url, prefix, dispatch_n, start_at, kind == "dispatch")] * producers)
        if cpu is not None:
            cpu.append(1e6 * statistics.mean(c for _, c in out))
        return float(sum(r for r, _ in out))
    if kind in ("store", "store-blocking"):
        done = pool.starmap(_store_producer, [(url, prefix, seconds, start_at, kind == "store")] * producers)
        if cpu is not None:
            cpu.append(1e6 * sum(c for _, c in done) / max(1, sum(n for n, _ in done)))
        return sum(n for n, _ in done) / seconds
    wait = 1 if kind == "append-wait1" else 0
    counts = pool.starmap(_append_producer, [(url, prefix, seconds, start_at, kind == "raw", wait)] * producers)
    return sum(counts) / seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--producers", type=int, default=4, help="producer processes (default 4)")
    ap.add_argument("--seconds", type=float, default=3.0, help="length of each append measurement")
    ap.add_argument("--rounds", type=int, default=3, help="repetitions per figure; the median is shown")
    ap.add_argument("--quick", action="store_true", help="one short round (a smoke run)")
    args = ap.parse_args()
    if args.quick:
        args.seconds, args.rounds = 1.0, 1
    dispatch_n = 300 if args.quick else 1500
    print(f"# bench/cluster.py  producers={args.producers} seconds={args.seconds:g} rounds={args.rounds}  "
          f"python {platform.python_version()}  {os.cpu_count()} cpu(s)  {platform.machine()}")
    print(f"# load average at start: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    clusters: dict[int, LocalCluster] = {}
    replicated: LocalCluster | None = None
    try:
        for masters in (1, 3):
            clusters[masters] = start_cluster(masters, 0)
        replicated = start_cluster(3, 1)
        results: dict[tuple[int, str], list[float]] = {}
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(args.producers) as pool:
            for _ in range(args.rounds):
                for kind in ("append", "raw", "dispatch", "dispatch-blocking", "store", "store-blocking"):
                    for masters, cluster in clusters.items():
                        rate = measure(pool, kind, cluster.url, args.producers, args.seconds, dispatch_n,
                                       results.setdefault((masters, kind + " cpu"), []))
                        results.setdefault((masters, kind), []).append(rate)
                for kind in ("append", "append-wait1"):
                    assert replicated is not None
                    rate = measure(pool, kind, replicated.url, args.producers, args.seconds, dispatch_n)
                    results.setdefault((0, kind), []).append(rate)
    finally:
        for cluster in [*clusters.values(), *([replicated] if replicated else [])]:
            cluster.close()
    med = {k: statistics.median(v) for k, v in results.items() if v}
    print(f"{'masters':>7} {'append/s':>10} {'raw RPUSH/s':>12} {'ours/raw':>9} {'dispatch conv/s':>16}")
    for masters in (1, 3):
        a, r, d = med[(masters, "append")], med[(masters, "raw")], med[(masters, "dispatch")]
        print(f"{masters:>7} {a:>10.0f} {r:>12.0f} {a / r:>9.2f} {d:>16.0f}")
    print(f"{'masters':>7} {'store append/s fast':>20} {'blocking':>9} {'fast/blocking':>14} {'fast/raw':>9} "
          f"{'dispatch conv/s fast':>21} {'blocking':>9} {'fast/blocking':>14}")
    for masters in (1, 3):
        sf, sb, r = med[(masters, "store")], med[(masters, "store-blocking")], med[(masters, "raw")]
        df, db = med[(masters, "dispatch")], med[(masters, "dispatch-blocking")]
        print(f"{masters:>7} {sf:>20.0f} {sb:>9.0f} {sf / sb:>14.2f} {sf / r:>9.2f} {df:>21.0f} {db:>9.0f} {df / db:>14.2f}")
    print("producer CPU per operation, µs (every thread of the producer process: what a busy machine barely inflates)")
    print(f"{'masters':>7} {'store append fast':>18} {'blocking':>9} {'blocking/fast':>14} "
          f"{'dispatch conv fast':>19} {'blocking':>9} {'blocking/fast':>14}")
    for masters in (1, 3):
        sf, sb = med[(masters, "store cpu")], med[(masters, "store-blocking cpu")]
        df, db = med[(masters, "dispatch cpu")], med[(masters, "dispatch-blocking cpu")]
        print(f"{masters:>7} {sf:>18.0f} {sb:>9.0f} {sb / sf:>14.2f} {df:>19.0f} {db:>9.0f} {db / df:>14.2f}")
    print(f"scaling 3/1 masters: append {med[(3, 'append')] / med[(1, 'append')]:.2f}x, "
          f"raw RPUSH {med[(3, 'raw')] / med[(1, 'raw')]:.2f}x, dispatch {med[(3, 'dispatch')] / med[(1, 'dispatch')]:.2f}x")
    w0, w1 = med[(0, "append")], med[(0, "append-wait1")]
    print(f"3 masters + 3 replicas: append {w0:.0f}/s, with redis_wait_replicas=1 {w1:.0f}/s "
          f"({w1 / w0:.2f}x)")


if __name__ == "__main__":
    main()
