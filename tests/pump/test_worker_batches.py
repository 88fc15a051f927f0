"""A worker on one tasks stream reads short tasks in batches and hands their results in with one
MULTI. Before a task of a listener known to run long it hands in what is done and gives the tasks
read behind it back to the stream; a task that runs long unexpectedly keeps the ones behind it from
being taken over (the heartbeat re-claims every task in hand). Each task is answered once. A real
redis-server; the worker runs in a thread of the test (the loop `xml-pipeline worker` runs), or
step by step."""
from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

from pump_harness import SIGNING_KEY, organism_yaml

from xml_pipeline.memory import create_backend
from xml_pipeline.message_bus.dispatcher import RedisDispatcher
from xml_pipeline.message_bus.message import Message
from xml_pipeline.message_bus.streams import WORKER_GROUP, Streams
from xml_pipeline.message_bus.worker import DistributedWorker
from xml_pipeline.message_bus.worker_task import WorkerTask, new_key
from xml_pipeline.organism import load_organism

LISTENERS = """
- {name: echo, handler: "xp_test_handlers:echo", cpu_bound: true}
- {name: slow, handler: "xp_test_handlers:slow", cpu_bound: true}
"""


def _setup(tmp_path: Path, redis_url: str, prefix: str, **pool: Any) -> tuple[Any, Any]:
    path = tmp_path / "organism.yaml"
    path.write_text(organism_yaml(name="batches", backend={"type": "redis", "redis_url": redis_url,
                                                           "redis_prefix": prefix, "redis_ttl": 300},
                                  listeners=LISTENERS, pool={"workers": 1, "max_attempts": 2, **pool}))
    organism = load_organism(path, environ={"XP_SIGNING_KEY": SIGNING_KEY})
    return organism, create_backend(organism.backend)


def _task(listener: str, payload: str) -> WorkerTask:
    return WorkerTask(new_key(), listener, f"xp_test_handlers:{listener}", "", "",
                      message=Message("console", listener, payload, thread="t1"))


def _start(worker: DistributedWorker) -> threading.Thread:
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    return thread


def _execs(client: Any) -> int:
    return int(client.info("commandstats").get("cmdstat_exec", {}).get("calls", 0))


async def test_short_tasks_are_handed_in_a_batch_at_a_time(redis_server, prefix: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    organism, backend = _setup(tmp_path, redis_server.url, prefix)
    client = redis_server.client()
    dispatcher = RedisDispatcher(backend)
    await dispatcher.start()
    worker = DistributedWorker(backend, organism)
    try:
        warm = [asyncio.ensure_future(dispatcher.run(_task("echo", f'<e tag="w{i}"/>'))) for i in range(16)]
        thread = _start(worker)
        await asyncio.wait_for(asyncio.gather(*warm), 30)  # the worker learns how short the tasks are
        assert worker._batch_size() > 1  # noqa: SLF001
        execs = _execs(client)
        tasks = [_task("echo", f'<e tag="{i}"/>') for i in range(64)]
        results = await asyncio.wait_for(asyncio.gather(*(dispatcher.run(t) for t in tasks)), 30)
        handed_in = _execs(client) - execs
    finally:
        worker.request_stop()
        await dispatcher.close()
    thread.join(10)
    assert all(r.ok and r.response is not None and f'tag=\\"{i}\\"' in r.response.decode()
               for i, r in enumerate(results)), results[:3]
    # The dispatcher's submits are a MULTI each too; far fewer than one per task all the same.
    assert handed_in <= 64 // 2, handed_in
    s = Streams(backend)
    assert client.xlen(s.tasks) == 0 and client.xpending(s.tasks, WORKER_GROUP)["pending"] == 0
    backend.close()


async def test_an_unexpectedly_long_task_in_a_batch_keeps_the_ones_behind_it(redis_server, prefix: str,  # type: ignore[no-untyped-def]
                                                                               tmp_path: Path) -> None:
    # claim_idle well under the long task: without the heartbeat of every task in hand, another
    # consumer's XAUTOCLAIM would take the queued short tasks while the long one runs.
    organism, backend = _setup(tmp_path, redis_server.url, prefix, claim_idle_seconds=0.6, heartbeat_seconds=0.1)
    client = redis_server.client()
    s = Streams(backend)
    dispatcher = RedisDispatcher(backend)
    await dispatcher.start()
    worker = DistributedWorker(backend, organism)
    markers = [tmp_path / f"m{i}" for i in range(5)]
    try:
        # Both listeners known as short: a slow task that runs 2 s is a surprise.
        warm = [asyncio.ensure_future(dispatcher.run(_task(name, '<s seconds="0"/>')))
                for i in range(16) for name in ("echo", "slow")]
        thread = _start(worker)
        await asyncio.wait_for(asyncio.gather(*warm), 30)
        runs = [asyncio.ensure_future(dispatcher.run(_task("slow", f'<s seconds="2" marker="{markers[0]}"/>')))]
        runs += [asyncio.ensure_future(dispatcher.run(_task("echo", f'<e marker="{m}"/>'))) for m in markers[1:]]
        stolen: list[Any] = []
        for _ in range(30):  # while the long task runs, a thief claims whatever went idle
            await asyncio.sleep(0.1)
            got = client.xautoclaim(s.tasks, WORKER_GROUP, "thief", 600, count=10)[1]
            stolen += [e for e in got if e]
        results = await asyncio.wait_for(asyncio.gather(*runs), 30)
    finally:
        worker.request_stop()
        await dispatcher.close()
    thread.join(10)
    assert stolen == []
    assert all(r.ok for r in results)
    assert [len(m.read_text().split()) for m in markers] == [1] * 5  # each ran once
    backend.close()


async def test_before_a_task_known_to_run_long_the_ones_read_behind_it_are_given_back(
        redis_server, prefix: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    organism, backend = _setup(tmp_path, redis_server.url, prefix)
    client = redis_server.client()
    s = Streams(backend)
    dispatcher = RedisDispatcher(backend)
    await dispatcher.start()
    worker = DistributedWorker(backend, organism)
    worker._next_claim = float("inf")  # noqa: SLF001 - no reclaim in these steps
    try:
        for long_one in (False, True):
            worker._run_avg = 1e-4  # noqa: SLF001 - recent tasks short: batches of MAX_BATCH
            worker._listener_avg = {"echo": 1e-4, "slow": 1.0 if long_one else 1e-4}  # noqa: SLF001
            tasks = [_task("slow", '<s seconds="0.1"/>')] + [_task("echo", f'<e tag="{i}"/>') for i in range(4)]
            runs = [asyncio.ensure_future(dispatcher.run(t)) for t in tasks]
            while client.xlen(s.tasks) < 5:
                await asyncio.sleep(0.01)
            first = worker._read_one()  # noqa: SLF001
            assert first is not None and len(worker._queue) == 4  # noqa: SLF001 - one batch of five
            worker._handle(*first)  # noqa: SLF001 - the slow task
            pending = client.xpending(s.tasks, WORKER_GROUP)["pending"]
            if long_one:
                # Given back: four new entries nobody holds; only the slow task's (run, not handed in).
                assert len(worker._queue) == 0 and pending == 1 and client.xlen(s.tasks) == 5  # noqa: SLF001
            else:
                assert len(worker._queue) == 4 and pending == 5  # noqa: SLF001 - kept, in hand
            while worker._queue or worker._done or client.xlen(s.tasks):  # noqa: SLF001 - finish the rest
                entry = worker._queue.popleft() if worker._queue else worker._read_one()  # noqa: SLF001
                if entry is not None:
                    worker._handle(*entry)  # noqa: SLF001
                worker._hand_in(final=not worker._queue)  # noqa: SLF001
            results = await asyncio.wait_for(asyncio.gather(*runs), 30)
            assert all(r.ok for r in results) and len({r.task_id for r in results}) == 5
            assert client.xlen(s.tasks) == 0 and client.xpending(s.tasks, WORKER_GROUP)["pending"] == 0
    finally:
        await dispatcher.close()
    backend.close()
