"""StreamPump with local worker processes: routing, the worker data flow, failures, temp keys."""
from __future__ import annotations

import asyncio
import logging
import os
import pickle
from collections.abc import Iterator
from pathlib import Path

import pytest
from pump_harness import SIGNING_KEY, organism_yaml

from xml_pipeline.errors import SlotIntegrityError
from xml_pipeline.memory import BackendConfig, InMemoryBackend, ManagerBackend, create_backend
from xml_pipeline.memory.signing import Signer
from xml_pipeline.message_bus.local_pool import PREFETCH, LocalWorkerPool, ThreadWorkerPool
from xml_pipeline.message_bus.actions import Reply
from xml_pipeline.message_bus.message import Message
from xml_pipeline.message_bus.stream_pump import StreamPump
from xml_pipeline.message_bus.worker_task import (
    INTEGRITY_ERROR,
    WorkerResult,
    WorkerTask,
    execute_task,
    load_inputs,
    store_inputs,
    take_response,
)
from xml_pipeline.organism import Organism, parse_organism

LISTENERS = """
- {name: echo, handler: "xp_test_handlers:echo", cpu_bound: true}
- {name: fail, handler: "xp_test_handlers:fail", cpu_bound: true}
- {name: die, handler: "xp_test_handlers:die", cpu_bound: true}
- {name: diewhen, handler: "xp_test_handlers:die_when", cpu_bound: true}
- {name: slow, handler: "xp_test_handlers:slow", cpu_bound: true}
- {name: relay, handler: "xp_test_handlers:relay"}
- {name: plainfail, handler: "xp_test_handlers:fail"}
- {name: aecho, handler: "xp_test_handlers:async_echo"}
"""


def make_organism(name: str = "t", backend: str = "manager") -> Organism:
    return parse_organism(organism_yaml(name=name, backend={"type": backend}, listeners=LISTENERS), environ={})


@pytest.fixture(scope="module")
def manager() -> Iterator[ManagerBackend]:
    b = ManagerBackend(BackendConfig(backend_type="manager", signing_key=SIGNING_KEY))
    yield b
    b.close()


def ask(to: str, payload: str, sender: str = "console") -> Message:
    return Message(sender=sender, to=to, payload=payload)


def attr(m: Message, name: str) -> str:
    el = m.element()
    assert el is not None, m
    return el.get(name, "")


@pytest.mark.parametrize("start_method", ["spawn", "forkserver"])
async def test_local_pool_runs_cpu_bound_handlers_in_worker_processes(manager: ManagerBackend, start_method: str) -> None:
    pool = LocalWorkerPool(manager, workers=2, start_method=start_method)
    async with StreamPump(make_organism(f"pool-{start_method}"), manager, dispatcher=pool) as pump:
        replies = await asyncio.gather(*(pump.request(ask("echo", f'<e tag="{i}"/>'), timeout=60) for i in range(6)))
        worker_pids = {w.process.pid for w in pool._workers}
    for i, outs in enumerate(replies):
        assert len(outs) == 1
        (m,) = outs
        assert (m.sender, m.to, m.kind) == ("echo", "console", "response")
        assert attr(m, "tag") == str(i)
        assert int(attr(m, "pid")) in worker_pids and int(attr(m, "pid")) != os.getpid()
    assert manager.info()["temp_entries"] == 0  # the pump deleted every temp key


async def test_call_chain_routes_back_and_every_message_is_buffered(manager: ManagerBackend) -> None:
    pool = LocalWorkerPool(manager, workers=1)
    async with StreamPump(make_organism("chain"), manager, dispatcher=pool) as pump:
        request = ask("relay", '<e tag="x"/>')
        (out,) = await pump.request(request, timeout=60)
        registry = pump.registry
        assert out.sender == "relay" and out.to == "console" and out.in_reply_to == request.id
        assert out.payload.startswith("<relayed><echo ") and 'tag="x"' in out.payload
        chains = registry.debug_dump()
        assert chains[out.thread] == "system.chain.console"  # type: ignore[index]
        assert "system.chain.console.relay.echo" in chains.values()
        # console→relay, relay→echo, echo→relay, relay→console: four messages in the buffer
        slots = [s for t, c in chains.items() if c.startswith("system.chain.console")
                 for s in pump.buffer.get_thread_slots(t)]
        assert sorted((s.from_id, s.to_id) for s in slots) == sorted(
            [("console", "relay"), ("relay", "echo"), ("echo", "relay"), ("relay", "console")])
        assert all(isinstance(s.payload, Message) for s in slots)
        assert [s.metadata.slot_index for s in pump.buffer.get_thread_slots(out.thread)] == [0]  # type: ignore[arg-type]


async def test_handler_that_raises_gives_an_error_response_and_the_pump_goes_on(
        manager: ManagerBackend, capfd: pytest.CaptureFixture[str]) -> None:
    pool = LocalWorkerPool(manager, workers=1)
    async with StreamPump(make_organism("raise"), manager, dispatcher=pool) as pump:
        request = ask("fail", "<x/>")
        (err,) = await pump.request(request, timeout=60)
        (ok,) = await pump.request(ask("echo", "<e/>"), timeout=60)
    assert err.kind == "error" and err.in_reply_to == request.id and err.to == "console"
    assert 'type="HandlerError"' in err.payload and "RuntimeError: boom" in err.payload
    assert ok.kind == "response"
    assert pool.deaths == 0
    assert "listener fail (handler xp_test_handlers:fail) raised on thread" in capfd.readouterr().err


async def test_worker_that_dies_gives_an_error_response_and_is_replaced(
        manager: ManagerBackend, caplog: pytest.LogCaptureFixture) -> None:
    pool = LocalWorkerPool(manager, workers=1)
    caplog.set_level(logging.ERROR, logger="xml_pipeline")
    async with StreamPump(make_organism("die"), manager, dispatcher=pool) as pump:
        first_pid = pool._workers[0].process.pid
        (err,) = await pump.request(ask("die", "<x/>"), timeout=60)
        outs = await asyncio.gather(*(pump.request(ask("echo", "<e/>"), timeout=60) for _ in range(3)))
        assert pool.deaths == 1
    assert err.kind == "error" and 'type="WorkerDied"' in err.payload and "exit code 17" in err.payload
    assert all(o[0].kind == "response" and int(attr(o[0], "pid")) != first_pid for o in outs)
    assert any("died (exit code 17) while running listener 'die'" in r.getMessage() for r in caplog.records)
    assert manager.info()["temp_entries"] == 0


async def test_tasks_queued_behind_a_dying_task_run_once_on_the_next_worker(
        manager: ManagerBackend, tmp_path: Path) -> None:
    """A worker has the next task waiting on its pipe (PREFETCH): when it dies, only the task it was
    running is answered with WorkerDied; the one behind it never started and runs on the new worker."""
    assert PREFETCH >= 2
    pool = LocalWorkerPool(manager, workers=1)
    marker, go = tmp_path / "echo.marker", tmp_path / "go"
    async with StreamPump(make_organism("prefetch"), manager, dispatcher=pool) as pump:
        worker = pool._workers[0]
        dying = asyncio.create_task(pump.request(ask("diewhen", f'<x go="{go}"/>'), timeout=60))
        for _ in range(500):  # sequencing, not timing: the dying task is on the worker's pipe first
            if len(worker.tasks) == 1:
                break
            await asyncio.sleep(0.01)
        echoing = asyncio.create_task(pump.request(ask("echo", f'<e marker="{marker}"/>'), timeout=60))
        for _ in range(500):  # ... and the echo behind it
            if len(worker.tasks) == 2:
                break
            await asyncio.sleep(0.01)
        assert [t.listener for t, _ in worker.tasks] == ["diewhen", "echo"]
        go.touch()
        died, echoed = await dying, await echoing
        assert pool.deaths == 1
    assert died[0].kind == "error" and 'type="WorkerDied"' in died[0].payload
    assert echoed[0].kind == "response" and int(attr(echoed[0], "pid")) != worker.process.pid
    assert marker.read_text().split() == [attr(echoed[0], "pid")]  # ran once, on the new worker


async def test_plain_listeners_run_in_the_pump_and_failures_become_errors(caplog: pytest.LogCaptureFixture) -> None:
    backend = InMemoryBackend()
    caplog.set_level(logging.ERROR, logger="xml_pipeline")
    org = make_organism("plain", backend="memory")
    async with StreamPump(org, backend, dispatcher=ThreadWorkerPool(backend, workers=2)) as pump:
        (err,) = await pump.request(ask("plainfail", "<x/>"))
        (aok,) = await pump.request(ask("aecho", "<x/>"))
        (eok,) = await pump.request(ask("echo", "<x/>"))  # cpu_bound on the memory backend: a thread
        (unknown,) = await pump.request(ask("nobody", "<x/>"))
        (spoof,) = await pump.request(ask("echo", "<x/>", sender="relay"))
    assert err.kind == "error" and "RuntimeError: boom" in err.payload
    assert attr(aok, "pid") == str(os.getpid()) and attr(aok, "async") == "yes"
    assert attr(eok, "pid") == str(os.getpid())
    assert unknown.kind == "error" and "unknown listener 'nobody'" in unknown.payload
    assert spoof.kind == "error" and "must name the external sender" in spoof.payload
    assert any("listener plainfail" in r.getMessage() for r in caplog.records)
    backend.close()


def test_forged_or_swapped_temp_values_raise_slot_integrity_error(manager: ManagerBackend) -> None:
    msg = Message("console", "echo", "<e/>", thread="t1")
    pk, mk = store_inputs(manager, msg)
    task = WorkerTask("task1", "echo", "xp_test_handlers:echo", pk, mk)
    assert load_inputs(manager, task) == msg
    # A pickle that would run a command, stored raw: rejected before anything is unpickled.
    manager.temp_put(pk, pickle.dumps((os.system, ("echo pwned",))))
    with pytest.raises(SlotIntegrityError):
        load_inputs(manager, task)
    # Signed with a key the organism does not know.
    manager.temp_put(pk, Signer.random().sign(b"P<e/>"))
    with pytest.raises(SlotIntegrityError):
        load_inputs(manager, task)
    # A genuine metadata envelope moved to the payload key.
    pk2, mk2 = store_inputs(manager, msg)
    with pytest.raises(SlotIntegrityError, match="different kind"):
        load_inputs(manager, WorkerTask("task2", "echo", "xp_test_handlers:echo", mk2, pk2))
    # What a worker does with it: an error result, nothing executed.
    result = execute_task(manager, task, worker="w")
    assert not result.ok and result.error_type == INTEGRITY_ERROR
    manager.temp_delete(pk, mk, pk2, mk2)


def test_temp_keys_are_not_threads_carry_the_ttl_and_are_cleaned_up(redis_server, prefix: str) -> None:  # type: ignore[no-untyped-def]
    """The temp-key form of the data flow (what a worker answers for a task whose inputs a caller
    stored): inputs and response carry the backend's TTL, are not threads, and are gone once taken."""
    config = BackendConfig(backend_type="redis", redis_url=redis_server.url, redis_prefix=prefix,
                           redis_ttl=300, signing_key=SIGNING_KEY)
    backend = create_backend(config)
    client = redis_server.client()
    msg = Message("console", "echo", "<e/>", thread="t1")
    backend.buffer_append("t1", b"not a temp value")
    pk, mk = store_inputs(backend, msg)
    result = execute_task(backend, WorkerTask("task1", "echo", "xp_test_handlers:echo", pk, mk), worker="w")
    assert result.ok and result.response_key is not None
    tmp_keys = list(client.scan_iter(match=f"{prefix}tmp:*"))
    assert len(tmp_keys) == 3  # payload, metadata, response
    assert all(0 < client.ttl(k) <= 300 for k in tmp_keys)
    assert backend.buffer_list_threads() == ["t1"]
    info = backend.info()
    assert info["buffer_threads"] == 1 and info["registry_entries"] == len(backend.registry_list_all())
    (action,) = take_response(backend, result.response_key, [pk, mk])
    assert isinstance(action, Reply) and 'size="4"' in action.payload
    assert list(client.scan_iter(match=f"{prefix}tmp:*")) == []
    assert all(client.ttl(k) > 0 for k in client.scan_iter(match=f"{prefix}*"))
    backend.close()


async def test_a_local_worker_gets_its_message_with_the_task_and_no_temp_keys(redis_server, prefix: str) -> None:  # type: ignore[no-untyped-def]
    """The local pool's workers are the pump's children on pipes of their own: the message goes with
    the task and the response with the result; the slot is in the context buffer all the same."""
    backend = create_backend(BackendConfig(backend_type="redis", redis_url=redis_server.url, redis_prefix=prefix,
                                           redis_ttl=300, signing_key=SIGNING_KEY))
    client = redis_server.client()
    pool = LocalWorkerPool(backend, workers=1)
    async with StreamPump(make_organism("carried", backend="redis"), backend, dispatcher=pool) as pump:
        request = ask("slow", '<s seconds="1"/>')
        job = asyncio.create_task(pump.request(request, timeout=60))
        for _ in range(200):  # until the request's slot is stored (the task is under way from then on)
            if any(s.payload.id == request.id for t in backend.buffer_list_threads()
                   for s in pump.buffer.get_thread_slots(t)):
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("the request never reached the context buffer")
        assert list(client.scan_iter(match=f"{prefix}tmp:*")) == []
        (out,) = await job
        assert out.kind == "response" and out.in_reply_to == request.id
        assert pump.stats.worker_tasks == 1
    # Request and response both in the buffer, signed at their places; still no temp key.
    slots = [s for t in backend.buffer_list_threads() for s in pump.buffer.get_thread_slots(t)]
    assert sorted(s.from_id for s in slots) == ["console", "slow"]
    assert list(client.scan_iter(match=f"{prefix}tmp:*")) == []
    backend.close()


async def test_a_carried_response_that_does_not_decode_is_an_error_response(manager: ManagerBackend) -> None:
    """What a local worker sends back is checked like a stored response: garbage is MissingData."""
    class Garbled(LocalWorkerPool):
        async def run(self, task: WorkerTask) -> WorkerResult:
            result = await super().run(task)
            return WorkerResult(result.task_id, worker=result.worker, response=b'[{"op": "launch", "payload": "<x/>"}]')

    async with StreamPump(make_organism("garbled"), manager, dispatcher=Garbled(manager, workers=1)) as pump:
        (out,) = await pump.request(ask("echo", "<e/>"), timeout=60)
    assert out.kind == "error" and "MissingData" in out.payload and "unknown action" in out.payload


@pytest.mark.parametrize("backend_type", ["memory", "manager"])
async def test_the_pump_uses_the_configured_backend_by_itself(backend_type: str) -> None:
    """Spec, "With StreamPump": the organism.yaml's backend and process_pool are all it needs."""
    org = make_organism(f"auto-{backend_type}", backend=backend_type)
    async with StreamPump(org) as pump:
        (out,) = await pump.request(ask("echo", "<e/>"), timeout=60)
        kind = type(pump.dispatcher).__name__
        assert pump.backend.info()["backend"] == backend_type
    assert out.kind == "response"
    in_pump = int(attr(out, "pid")) == os.getpid()
    assert (kind, in_pump) == (("ThreadWorkerPool", True) if backend_type == "memory" else ("LocalWorkerPool", False))
    assert not pump.backend.ping()  # the pump created the backend, so it closed it
