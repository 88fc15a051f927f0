"""Benchmark: the serialization steps of one round trip, CPU per operation, each beside a raw baseline.

    .venv/bin/python bench/serialization.py [--quick]

What the pump and a worker do to a message besides talking to processes and servers: build and pickle
its slot, sign it, unpickle and verify slots when reading a thread, check a handler's reply, and for
a cpu_bound message the worker pod's data flow (the slot appended and the message sealed for its
task, opened by the worker — a large payload read from its slot —, the response sealed by the
worker and opened by the pump). Every figure is thread CPU time (best of 7 repeats),
so other load on the machine distorts it much less than wall-clock rates; run it on two trees (set
PYTHONPATH to another tree's `library`) to compare code versions.

Baselines (same run, same data): pickle of a plain dict holding the slot's fields (what a slot costs
without its classes, signature and place). The data-flow rows have none (compare trees instead):
they run against the bench's own redis-server, in this process, round trips included: `pump
step-in` is the append and the sealing, `worker` everything a worker does for the task besides its
stream commands (open, handler, seal), `pump step-out` the check of the response.
"""
from __future__ import annotations

import argparse
import os
import pickle
import secrets
import time
import timeit
from collections.abc import Callable
from typing import Any

from xml_pipeline.memory import BackendConfig, InMemoryBackend, get_shared_backend
from xml_pipeline.memory.context_buffer import ContextBuffer
from xml_pipeline.message_bus.message import Message, check_fragment
from xml_pipeline.message_bus.task_seal import namespace_of, open_response_body, seal_input
from xml_pipeline.message_bus.worker_task import WorkerTask, run_task

from benchkit import BenchRedis  # noqa: E402  (bench/ is the script directory)

KEY = secrets.token_hex(16)
HANDLER = "xml_pipeline.examples.cpu:burn"


def cpu_us(fn: Callable[[], Any], number: int) -> float:
    """Thread CPU per call in µs, best of 7 repeats."""
    return min(timeit.repeat(fn, number=number, repeat=7, timer=time.thread_time)) / number * 1e6


def row(what: str, ours: float, base_what: str = "", base: float | None = None) -> None:
    ratio = f"{base / ours:5.2f}x" if base is not None else ""
    base_s = f"{base:10.2f} µs" if base is not None else ""
    print(f"| {what} | {ours:.2f} µs | {base_what} | {base_s.strip()} | {ratio.strip()} |", flush=True)


def sealed_task(backend: Any, buffer: ContextBuffer, msg: Message, task_id: str) -> WorkerTask:
    """The pump's step in for a cpu_bound message on worker pods: the append (one round trip), then
    the message sealed for its task (a large payload stays in its slot)."""
    assert msg.thread is not None
    slot = buffer.append(msg.thread, msg, msg.sender, msg.to, own_name=msg.to, append_id=msg.id)
    sealed = seal_input(backend.signer, namespace_of(backend), task_id, "work", HANDLER, msg, slot.index)
    return WorkerTask(task_id, "work", HANDLER, "", "", sealed_input=sealed)


def data_flow(url: str, size: int, count: int) -> tuple[float, float]:
    """(pump step-in µs, worker µs, pump step-out µs) per message of `size` payload bytes, on Redis
    (round trips included)."""
    backend = get_shared_backend(BackendConfig(backend_type="redis", redis_url=url, signing_key=KEY,
                                               redis_prefix=f"bs{secrets.token_hex(4)}:", redis_ttl=600))
    buffer = ContextBuffer(backend)
    fragment = '<work rounds="0">' + "x" * max(0, size - 24) + "</work>"
    messages = [Message("console", "work", fragment, thread=f"t{i % 8}") for i in range(count + 2)]
    for i, m in enumerate(messages[:2]):  # warm up: scripts loaded, signing places made
        run_task(backend, sealed_task(backend, buffer, m, f"w{i}"))
    start = time.thread_time()
    tasks = [sealed_task(backend, buffer, m, f"t{i}") for i, m in enumerate(messages[2:])]
    pump = (time.thread_time() - start) / count
    use_direct = getattr(backend, "use_direct_connection", None)
    if use_direct is not None:
        use_direct()  # what a worker process does
    start = time.thread_time()
    results = [run_task(backend, task).result for task in tasks]
    worker = (time.thread_time() - start) / count
    assert all(r.ok for r in results)
    ns = namespace_of(backend)
    start = time.thread_time()
    for r in results:
        open_response_body(backend.signer, ns, r.task_id, r.sealed_response)
    collect = (time.thread_time() - start) / count
    backend.buffer_clear()
    backend.close()
    return pump * 1e6, worker * 1e6, collect * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run)")
    args = ap.parse_args()
    n = 2000 if args.quick else 20000
    print(f"# bench/serialization.py  load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print("| step | ours (CPU) | baseline | baseline (CPU) | ratio |")
    print("| --- | ---: | --- | ---: | ---: |")
    backend = InMemoryBackend(BackendConfig(backend_type="memory", signing_key=KEY))
    buffer = ContextBuffer(backend)
    msg = Message("console", "work", '<work rounds="0">' + "x" * 76 + "</work>", thread="t1")
    prepared = buffer.prepare("t1", msg, "console", "work", own_name="work", append_id=msg.id)
    fields = {"payload": {"sender": msg.sender, "to": msg.to, "payload": msg.payload, "thread": msg.thread,
                          "kind": msg.kind, "id": msg.id, "in_reply_to": None},
              "thread_id": "t1", "from_id": "console", "to_id": "work", "slot_index": -1,
              "timestamp": "2026-01-01T00:00:00.000000+00:00", "payload_type": "Message", "own_name": "work",
              "is_self_call": False, "usage_instructions": ""}
    plain = pickle.dumps(fields, pickle.HIGHEST_PROTOCOL)
    row("build + pickle a slot (100 B message)",
        cpu_us(lambda: buffer.prepare("t1", msg, "console", "work", own_name="work", append_id=msg.id), n),
        "pickle.dumps of a dict of its fields", cpu_us(lambda: pickle.dumps(fields, pickle.HIGHEST_PROTOCOL), n))
    row("unpickle a slot", cpu_us(lambda: pickle.loads(prepared.body), n),
        "pickle.loads of that dict", cpu_us(lambda: pickle.loads(plain), n))
    row("sign a slot for its index", cpu_us(lambda: prepared._place.sign(3, b"id", prepared.body), n))  # noqa: SLF001
    row("Message.with_(thread=...)", cpu_us(lambda: msg.with_(thread="t2"), n))
    row("check_fragment of a handler's reply",
        cpu_us(lambda: check_fragment('<done rounds="0" bytes="100" digest="0123456789abcdef"/>'), n))
    task = WorkerTask("a" * 32, "work", HANDLER, "", "", reply_to="r", sealed_input=b"s" * 200)
    row("WorkerTask.to_fields (a stream entry)", cpu_us(task.to_fields, n))
    for _ in range(1000):
        buffer.append("big", Message("console", "work", "<w/>" + "y" * 500, thread="big"), "console", "work")
    blobs = [pickle.dumps(dict(fields, payload="<w/>" + "y" * 500), pickle.HIGHEST_PROTOCOL) for _ in range(1000)]
    row("get_thread_slots of 1,000 slots, per slot (verify + unpickle)",
        cpu_us(lambda: buffer.get_thread_slots("big"), max(2, n // 1000)) / 1000,
        "pickle.loads of a dict, per slot", cpu_us(lambda: [pickle.loads(b) for b in blobs], max(2, n // 1000)) / 1000)
    server = BenchRedis(name="serialization")
    try:
        for label, size, count in (("100 B", 100, 200 if args.quick else 2000), ("1 MB", 1 << 20, 10 if args.quick else 40)):
            pump, worker, collect = data_flow(server.url, size, count)
            row(f"data flow {label}: pump step-in (slot append, one round trip; input sealed)", pump)
            row(f"data flow {label}: worker (open input, handler, seal response)", worker)
            row(f"data flow {label}: pump step-out (open the response)", collect)
    finally:
        server.stop()
    print(f"# load average at end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
