"""Benchmark: the shared backends against the raw tools they are built on, in one run.

    .venv/bin/python bench/backends.py [--rounds 7] [--quick]

Starts its own redis-server on a free port. For each backend (memory, manager, redis) it measures
ops/s of buffer_append, buffer_get_thread (a 1,000-slot thread), registry_set and
registry_get_uuid, and beside them, on the same server / machine, the raw baselines:

- redis-py RPUSH of a blob of the same size, and LRANGE + pickle.loads of 1,000 pickles of the same
  slot (our read path also verifies every slot's HMAC before unpickling);
- one plain call on a raw multiprocessing Manager proxy (a registered object's method doing the
  same work on a dict), for each manager operation.

Each operation and its baseline are timed in alternating rounds; the figure is the median round.
Aims: redis append >= 0.8x RPUSH, redis get_thread >= 0.8x LRANGE+unpickle, manager op >= 0.8x one
raw proxy call. Not a test: nothing asserts on speed.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import pickle
import platform
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from multiprocessing.managers import BaseManager
from pathlib import Path
from typing import Any

import redis

from xml_pipeline.memory import BackendConfig, get_shared_backend
from xml_pipeline.memory.serialization import deserialize_slot, serialize_slot
from xml_pipeline.memory.slots import UNASSIGNED, BufferSlot, SlotMetadata

THREAD_SLOTS = 1000
SIGNING_KEY = secrets.token_hex(16)


# -- the raw Manager baseline -------------------------------------------------------------------------

class RawStore:
    """What a naive manager-based store would register: plain dicts, one method per operation."""

    def __init__(self) -> None:
        self.lists: dict[str, list[bytes]] = {}
        self.kv: dict[str, str] = {}

    def append(self, key: str, blob: bytes) -> int:
        lst = self.lists.setdefault(key, [])
        lst.append(blob)
        return len(lst) - 1

    def get_list(self, key: str) -> list[bytes]:
        return list(self.lists.get(key, ()))

    def set(self, key: str, value: str) -> None:
        self.kv[key] = value

    def get(self, key: str) -> str | None:
        return self.kv.get(key)


class RawManager(BaseManager):
    pass


RawManager.register("RawStore", RawStore)


# -- helpers ----------------------------------------------------------------------------------------

def start_redis() -> tuple[subprocess.Popen[bytes], int, Path]:
    exe = shutil.which("redis-server")
    if exe is None:
        sys.exit("redis-server is not installed (apt-get install redis-server)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    workdir = Path(tempfile.mkdtemp(prefix="xp-bench-backends-"))
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    for _ in range(500):
        try:
            if client.ping():
                break
        except redis.RedisError:
            time.sleep(0.01)
    client.close()
    return proc, port, workdir


def sample_slot(i: int = 0) -> BufferSlot:
    """A slot of the size a typical routed message has (a few hundred bytes of payload)."""
    payload = {"to": "analyzer", "text": "lorem ipsum dolor sit amet " * 8, "n": i}
    meta = SlotMetadata(thread_id="bench-thread", from_id="console", to_id="analyzer", slot_index=UNASSIGNED,
                        timestamp=datetime.now(timezone.utc).isoformat(), payload_type="dict")
    return BufferSlot(payload=payload, metadata=meta)


@dataclass
class Row:
    backend: str
    op: str
    ours: float
    baseline_name: str = ""
    baseline: float | None = None
    aim: float | None = None

    @property
    def ratio(self) -> float | None:
        return None if self.baseline is None else self.ours / self.baseline


def rate(fn: Callable[[int], Any], n: int) -> float:
    start = time.perf_counter()
    for i in range(n):
        fn(i)
    return n / (time.perf_counter() - start)


def compare(ours: Callable[[int], Any], raw: Callable[[int], Any] | None, n: int, rounds: int) -> tuple[float, float | None]:
    """Median ops/s of `ours` and `raw`, timed in alternating rounds after a warm-up."""
    rate(ours, max(1, n // 10))
    if raw is not None:
        rate(raw, max(1, n // 10))
    a: list[float] = []
    b: list[float] = []
    for _ in range(rounds):
        a.append(rate(ours, n))
        if raw is not None:
            b.append(rate(raw, n))
    return statistics.median(a), (statistics.median(b) if b else None)


# -- the measurements ---------------------------------------------------------------------------------

def bench_backend(kind: str, backend: Any, rounds: int, quick: bool,
                  raw_redis: redis.Redis | None = None, raw_proxy: Any = None) -> list[Row]:
    rows: list[Row] = []
    signer = backend.signer
    blob = serialize_slot(sample_slot(), signer=signer)
    body = pickle.dumps(sample_slot(), protocol=pickle.HIGHEST_PROTOCOL)
    n_fast = 500 if quick else 2000
    n_read = 10 if quick else 40
    threads = [f"bench-{kind}-{i}" for i in range(50)]
    for i, t in enumerate(threads):  # appends go to registered threads, as routed messages do
        backend.registry_set(f"console.analyzer.{kind}{i}", t)

    # buffer_append
    raw_append: Callable[[int], Any] | None = None
    base_name = ""
    if raw_redis is not None:
        raw_append = lambda i: raw_redis.rpush(f"raw:buffer:{{{threads[i % 50]}}}", blob)  # noqa: E731
        base_name = "redis-py RPUSH"
    elif raw_proxy is not None:
        raw_append = lambda i: raw_proxy.append(threads[i % 50], blob)  # noqa: E731
        base_name = "raw proxy append()"
    ours, raw = compare(lambda i: backend.buffer_append(threads[i % 50], blob), raw_append, n_fast, rounds)
    rows.append(Row(kind, f"buffer_append ({len(blob)} B slot)", ours, base_name, raw,
                    0.8 if raw is not None else None))

    # buffer_get_thread of a 1,000-slot thread
    backend.buffer_delete_thread("reader")
    for i in range(THREAD_SLOTS):
        backend.buffer_append("reader", blob)
    if raw_redis is not None:
        raw_redis.delete("raw:reader")
        raw_redis.rpush("raw:reader", *[body] * THREAD_SLOTS)
        ours, raw = compare(lambda i: [deserialize_slot(x, signer=signer) for x in backend.buffer_get_thread("reader")],
                            lambda i: [pickle.loads(x) for x in raw_redis.lrange("raw:reader", 0, -1)], n_read, rounds)
        rows.append(Row(kind, "get_thread 1,000 slots + verify + unpickle", ours, "LRANGE + unpickle", raw, 0.8))
        ours, raw = compare(lambda i: backend.buffer_get_thread("reader"),
                            lambda i: raw_redis.lrange("raw:reader", 0, -1), n_read, rounds)
        rows.append(Row(kind, "buffer_get_thread 1,000 slots (bytes)", ours, "LRANGE (bytes)", raw))
    else:
        raw_read = None
        if raw_proxy is not None:
            for i in range(THREAD_SLOTS):
                raw_proxy.append("reader", blob)
            raw_read = lambda i: raw_proxy.get_list("reader")  # noqa: E731
        ours, raw = compare(lambda i: backend.buffer_get_thread("reader"), raw_read, n_read, rounds)
        rows.append(Row(kind, "buffer_get_thread 1,000 slots (bytes)", ours,
                        "raw proxy get_list()" if raw is not None else "", raw, 0.8 if raw is not None else None))
        ours_full, _ = compare(lambda i: [deserialize_slot(x, signer=signer) for x in backend.buffer_get_thread("reader")],
                               None, n_read, rounds)
        rows.append(Row(kind, "get_thread 1,000 slots + verify + unpickle", ours_full))

    # registry_set / registry_get_uuid
    chains = [f"console.greeter.n{i}" for i in range(200)]
    uuids = [f"uuid-{kind}-{i}" for i in range(200)]
    for op, fn, raw_fn, raw_name in (
        ("registry_set", lambda i: backend.registry_set(chains[i % 200], uuids[i % 200]),
         (lambda i: raw_redis.set(f"raw:chain:{chains[i % 200]}", uuids[i % 200])) if raw_redis is not None else
         (lambda i: raw_proxy.set(chains[i % 200], uuids[i % 200])) if raw_proxy is not None else None,
         "redis-py SET" if raw_redis is not None else "raw proxy set()"),
        ("registry_get_uuid", lambda i: backend.registry_get_uuid(chains[i % 200]),
         (lambda i: raw_redis.get(f"raw:chain:{chains[i % 200]}")) if raw_redis is not None else
         (lambda i: raw_proxy.get(chains[i % 200])) if raw_proxy is not None else None,
         "redis-py GET" if raw_redis is not None else "raw proxy get()"),
    ):
        ours, raw = compare(fn, raw_fn, n_fast, rounds)
        aim = 0.8 if (raw_proxy is not None and raw is not None) else None  # the manager aim covers every op
        rows.append(Row(kind, op, ours, raw_name if raw is not None else "", raw, aim))
    backend.buffer_clear()
    backend.registry_clear()
    return rows


def print_table(rows: list[Row]) -> None:
    head = f"{'backend':8} {'operation':44} {'ops/s':>10}  {'baseline':24} {'ops/s':>10} {'ratio':>6}  aim"
    print(head)
    print("-" * len(head))
    for r in rows:
        base = f"{r.baseline:10,.0f}" if r.baseline is not None else " " * 10
        ratio = f"{r.ratio:5.2f}x" if r.ratio is not None else " " * 6
        aim = ""
        if r.aim is not None and r.ratio is not None:
            aim = f">= {r.aim}x " + ("met" if r.ratio >= r.aim else "MISSED")
        print(f"{r.backend:8} {r.op:44} {r.ours:10,.0f}  {r.baseline_name:24} {base} {ratio}  {aim}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="alternating timed rounds per operation (median)")
    parser.add_argument("--quick", action="store_true", help="fewer operations per round (smoke run)")
    args = parser.parse_args()

    proc, port, workdir = start_redis()
    raw_manager = RawManager(ctx=multiprocessing.get_context("spawn"))
    raw_manager.start()
    backends: list[Any] = []
    try:
        redis_version = redis.Redis(port=port).info("server")["redis_version"]
        print(f"xml-pipeline backends benchmark — {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")
        print(f"python {platform.python_version()}, redis-py {redis.__version__}, redis-server {redis_version}, "
              f"{os.cpu_count()} CPUs, {platform.machine()}")
        print(f"median of {args.rounds} alternating rounds{' (quick)' if args.quick else ''}\n")
        rows: list[Row] = []

        memory = get_shared_backend(BackendConfig(backend_type="memory", signing_key=SIGNING_KEY))
        backends.append(memory)
        rows += bench_backend("memory", memory, args.rounds, args.quick)

        manager = get_shared_backend(BackendConfig(backend_type="manager", signing_key=SIGNING_KEY))
        backends.append(manager)
        raw_proxy = raw_manager.RawStore()  # type: ignore[attr-defined]
        rows += bench_backend("manager", manager, args.rounds, args.quick, raw_proxy=raw_proxy)

        url = f"redis://127.0.0.1:{port}/0"
        rb = get_shared_backend(BackendConfig(backend_type="redis", redis_url=url, redis_prefix="bench:",
                                              redis_ttl=86400, signing_key=SIGNING_KEY))
        backends.append(rb)
        raw = redis.Redis(port=port)  # redis-py defaults: what a naive implementation would use
        rows += bench_backend("redis", rb, args.rounds, args.quick, raw_redis=raw)
        raw.close()

        print_table(rows)
        missed = [r for r in rows if r.aim is not None and r.ratio is not None and r.ratio < r.aim]
        print(f"\n{len(missed)} aim(s) missed" + (": " + ", ".join(f"{r.backend} {r.op}" for r in missed)
                                                if missed else ""))
    finally:
        for b in backends:
            b.close()
        raw_manager.shutdown()
        proc.terminate()
        proc.wait(5)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
