"""Benchmark: the tasks stream split into buckets on a Redis Cluster, against one tasks stream, in one run.

    .venv/bin/python bench/cluster_tasks.py [--workers 4] [--messages 1500] [--rounds 3] [--quick]

One local cluster (tests/redis_cluster.py: 3 masters, no replicas, loopback). Per round, both
layouts on the same cluster, interleaved:

- buckets     the default on a cluster: the organism's tasks dealt over CLUSTER_TASKS_BUCKETS bucket
              streams spread over the masters (message_bus/streams.py, "Task buckets");
- one stream  the same code with one bucket (`tasks_buckets=1`): every task in the organism's slot,
              on one master (the layout without buckets) — the baseline.

What is measured, each with `--workers` worker processes and every message in flight at once:

- conversations  cpu_bound conversations per second through a StreamPump with a RedisDispatcher and
                 DistributedWorker processes (the `xml-pipeline pump` / `worker` path), the handler
                 doing no work (xml_pipeline.examples.cpu:burn with 0 rounds): thread data, temp
                 keys and the task streams together;
- tasks          the task streams alone: WorkerTasks through the RedisDispatcher to workers that
                 answer each at once with the worker's own steps (result, acknowledgement, the
                 chained read) and no handler, no inputs, no response: what the buckets change;

and the CPU of each master over the run (from /proc), with the busiest master's CPU per
conversation or task: what limits an organism whose master is the bottleneck. Printed: each rate,
the ratio buckets / one stream, the CPU per master. Not a test:
nothing asserts on speed. docs/performance.md ("Task buckets on a cluster") says what the figures
mean on this machine.
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
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from redis_cluster import LocalCluster, start_cluster  # noqa: E402

from benchkit import CPU_ORGANISM as ORGANISM, cpu_seconds  # noqa: E402  (bench/ is the script directory)
from xml_pipeline import contract  # noqa: E402
from xml_pipeline.memory import BackendConfig, get_shared_backend  # noqa: E402
from xml_pipeline.message_bus.dispatcher import RedisDispatcher  # noqa: E402
from xml_pipeline.message_bus.message import Message  # noqa: E402
from xml_pipeline.message_bus.stream_pump import StreamPump, run_messages  # noqa: E402
from xml_pipeline.message_bus.worker import DistributedWorker  # noqa: E402
from xml_pipeline.message_bus.worker_task import Outcome, WorkerResult, WorkerTask  # noqa: E402
from xml_pipeline.organism import parse_organism  # noqa: E402

SIGNING_KEY = secrets.token_hex(16)
FRAGMENT = '<work rounds="0">x</work>'


class AnswerAtOnce(DistributedWorker):
    """The "tasks" measurement's worker: each task answered at once through the worker's own Redis
    steps (no inputs fetched, no handler, no response stored)."""

    def _handle(self, bucket: int, entry_id: str, fields: dict[Any, Any], deliveries: int) -> None:
        task = WorkerTask.from_fields(fields)
        outcome = Outcome(WorkerResult(task.task_id, worker=self.name))
        if self.streams.sharded:
            self._write_result(task, outcome)
            self._ack(bucket, entry_id, chain=True)
        else:
            self._finish([(entry_id, task, outcome)], chain=True)


def _worker(config: BackendConfig, workers: int, buckets: int, stop: Any, bare: bool = False) -> None:
    """A distributed worker process (what `xml-pipeline worker` runs), stopped through an Event."""
    org = parse_organism(ORGANISM % workers, environ={})
    backend = get_shared_backend(config)
    worker = (AnswerAtOnce if bare else DistributedWorker)(backend, org, tasks_buckets=buckets)
    threading.Thread(target=lambda: (stop.wait(), worker.request_stop()), daemon=True).start()
    worker.run()
    backend.close()


async def rate(backend: Any, buckets: int, workers: int, count: int) -> float:
    org = parse_organism(ORGANISM % workers, environ={})
    dispatcher = RedisDispatcher(backend, tasks_buckets=buckets)
    async with StreamPump(org, backend, dispatcher=dispatcher, keep_outputs=False) as pump:
        await run_messages(pump, [Message("console", "work", FRAGMENT) for _ in range(workers * 8)])  # warm up
        elapsed = await run_messages(pump, [Message("console", "work", FRAGMENT) for _ in range(count)])
    return count / elapsed


async def task_rate(backend: Any, buckets: int, count: int) -> float:
    dispatcher = RedisDispatcher(backend, tasks_buckets=buckets)
    await dispatcher.start()
    window = asyncio.Semaphore(256)

    async def one(i: int) -> None:
        async with window:
            result = await dispatcher.run(WorkerTask(f"t{i}", "work", "h", "p", "m"))
            assert result.ok, result.error

    try:
        await asyncio.gather(*(one(i) for i in range(64)))  # warm up
        start = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(count)))
        return count / (time.perf_counter() - start)
    finally:
        await dispatcher.close()


def measure(cluster: LocalCluster, buckets: int, workers: int, count: int, ctx: Any,
            what: str = "conversations") -> tuple[float, list[float]]:
    """Conversations/s (or tasks/s) of one layout, and each master's CPU seconds during the run."""
    config = BackendConfig(backend_type="redis", redis_url=cluster.url, redis_prefix=f"bt{secrets.token_hex(4)}:",
                           redis_ttl=600, signing_key=SIGNING_KEY)
    backend = get_shared_backend(config)
    stop = ctx.Event()
    procs = [ctx.Process(target=_worker, args=(config, workers, buckets, stop, what == "tasks"))
             for _ in range(workers)]
    for p in procs:
        p.start()
    masters = [n.server.proc.pid for n in cluster.masters() if n.server.proc is not None]
    try:
        cpu0 = [cpu_seconds(pid) for pid in masters]
        got = asyncio.run(rate(backend, buckets, workers, count) if what == "conversations"
                          else task_rate(backend, buckets, count * 4))
        cpu = [cpu_seconds(pid) - c for pid, c in zip(masters, cpu0)]
    finally:
        stop.set()
        for p in procs:
            p.join(15)
        backend.buffer_clear()
        backend.registry_clear()
        backend.close()
    return got, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=4, help="worker processes (default 4)")
    ap.add_argument("--messages", type=int, default=1500, help="conversations per measurement (default 1500)")
    ap.add_argument("--rounds", type=int, default=3, help="repetitions per figure; the median is shown")
    ap.add_argument("--quick", action="store_true", help="300 messages, 1 round (a smoke run)")
    args = ap.parse_args()
    count, rounds = (300, 1) if args.quick else (args.messages, args.rounds)
    ctx = multiprocessing.get_context("spawn")
    print(f"# bench/cluster_tasks.py  workers={args.workers} messages={count} rounds={rounds}  "
          f"python {platform.python_version()}  {os.cpu_count()} cpu(s)  {platform.machine()}")
    print(f"# load average at start: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    cluster = start_cluster(masters=3, replicas_per_master=0)
    layouts = {"buckets": contract.CLUSTER_TASKS_BUCKETS, "one stream": 1}
    kinds = {"conversations": count, "tasks": count * 4}
    samples = {(k, name): [] for k in kinds for name in layouts}  # type: dict[tuple[str, str], list[float]]
    cpus = {key: [] for key in samples}  # type: dict[tuple[str, str], list[list[float]]]
    try:
        for _ in range(rounds):
            for kind in kinds:
                for name, buckets in layouts.items():
                    got, cpu = measure(cluster, buckets, args.workers, count, ctx, kind)
                    samples[(kind, name)].append(got)
                    cpus[(kind, name)].append(cpu)
                    print(f"  {kind:>13} {name:>10} ({buckets:>2} bucket(s)): {got:7.1f}/s; master CPU "
                          + " ".join(f"{c:.2f}s" for c in cpu), flush=True)
    finally:
        cluster.close()
    print(f"# load average at end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")

    def busiest(key: tuple[str, str]) -> float:
        """CPU of the busiest master per conversation or task (ms), median over the rounds: what
        limits an organism whose master is the bottleneck."""
        return statistics.median(max(c) for c in cpus[key]) / kinds[key[0]] * 1000

    print()
    print("| measured | layout | per second (median) | ratio to one stream | CPU per master, sorted, median (s) "
          "| busiest master, ms CPU each | ratio to one stream |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for kind in kinds:
        base = statistics.median(samples[(kind, "one stream")])
        for name in layouts:
            key = (kind, name)
            value = statistics.median(samples[key])
            ranked = [sorted(c, reverse=True) for c in cpus[key]]
            per_master = [statistics.median(c[i] for c in ranked) for i in range(len(ranked[0]))]
            label = "buckets (16)" if name == "buckets" else "one stream (baseline)"
            print(f"| {kind} | {label} | {value:.1f} | {value / base:.2f}x | "
                  f"{' / '.join(f'{c:.2f}' for c in per_master)} | {busiest(key):.3f} | "
                  f"{busiest(key) / busiest((kind, 'one stream')):.2f}x |")

if __name__ == "__main__":
    main()
