"""The local pool writes a large task without holding the pump's event loop (local_pool.py).

A worker is stopped (SIGSTOP) so it cannot read its pipe: a 4 MiB task sent to it mostly waits in
the pump, and the loop goes on meanwhile; once the worker runs again the rest is written as it
reads, and the answer is right. A worker killed before it read its task whole is replaced, the
task gets the WorkerDied error response, and the next task runs on the new worker.
"""
from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator

import pytest
from pump_harness import SIGNING_KEY, organism_yaml

from xml_pipeline.memory import BackendConfig, ManagerBackend
from xml_pipeline.message_bus.local_pool import LocalWorkerPool
from xml_pipeline.message_bus.message import Message
from xml_pipeline.message_bus.stream_pump import StreamPump
from xml_pipeline.organism import Organism, parse_organism

BIG = 4 << 20


def organism(name: str) -> Organism:
    listeners = '- {name: echo, handler: "xp_test_handlers:echo", cpu_bound: true}'
    return parse_organism(organism_yaml(name=name, backend={"type": "manager"}, listeners=listeners), environ={})


@pytest.fixture(scope="module")
def manager() -> Iterator[ManagerBackend]:
    b = ManagerBackend(BackendConfig(backend_type="manager", signing_key=SIGNING_KEY))
    yield b
    b.close()


def big_message(tag: str) -> Message:
    return Message(sender="console", to="echo", payload=f'<e tag="{tag}">' + "x" * BIG + "</e>")


async def until(condition: object, what: str) -> None:
    for _ in range(3000):  # sequencing, not timing: wait for the pool to get there
        if condition():  # type: ignore[operator]
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never happened: {what}")


async def test_a_large_task_waits_in_the_pump_while_the_loop_goes_on(manager: ManagerBackend) -> None:
    pool = LocalWorkerPool(manager, workers=1)
    async with StreamPump(organism("bigwrite"), manager, dispatcher=pool) as pump:
        await pump.request(Message(sender="console", to="echo", payload="<e/>"), timeout=60)  # ready
        worker = pool._workers[0]
        pid = worker.process.pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        try:
            reply = asyncio.create_task(pump.request(big_message("big"), timeout=120))
            await until(lambda: worker.out, "the task's unwritten part waits in the pump")
            ticks = 0
            for _ in range(20):  # the loop runs other callbacks while the write waits
                await asyncio.sleep(0)
                ticks += 1
            assert ticks == 20 and not reply.done()
            assert sum(memoryview(p).nbytes for p in worker.out) > BIG // 2  # most of it not written yet
        finally:
            os.kill(pid, signal.SIGCONT)
        (answer,) = await reply
        assert not worker.out
    el = answer.element()
    assert el is not None and answer.kind == "response"
    assert el.get("tag") == "big" and int(el.get("size", "0")) == len(big_message("big").payload)
    assert pool.deaths == 0


async def test_a_worker_killed_before_it_read_its_task_is_replaced(manager: ManagerBackend) -> None:
    pool = LocalWorkerPool(manager, workers=1)
    async with StreamPump(organism("bigdeath"), manager, dispatcher=pool) as pump:
        await pump.request(Message(sender="console", to="echo", payload="<e/>"), timeout=60)
        worker = pool._workers[0]
        pid = worker.process.pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        reply = asyncio.create_task(pump.request(big_message("lost"), timeout=120))
        await until(lambda: worker.out, "the task's unwritten part waits in the pump")
        os.kill(pid, signal.SIGKILL)
        (err,) = await reply
        await until(lambda: pool._workers and pool._workers[0] is not worker, "a new worker")
        (after,) = await pump.request(big_message("after"), timeout=120)
    assert err.kind == "error" and 'type="WorkerDied"' in err.payload
    assert worker.sock is None and not worker.out  # the dead worker's socket closed, its rest dropped
    el = after.element()
    assert after.kind == "response" and el is not None and el.get("tag") == "after"
    assert int(el.get("pid", "0")) != pid and pool.deaths == 1
