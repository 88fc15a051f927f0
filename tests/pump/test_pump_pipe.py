"""The pump's Redis hot path through its RedisPipe (group commit), against the blocking io-thread path.

Each scenario runs with `pipelined=True` and `pipelined=False` on real redis-servers and real worker
processes; both must give the same answers and the same context buffer. Beyond that: the pipe really
groups (fewer writes than commands), and a Redis outage with a batch in flight ends every
conversation (no hang), after which the pump works again.
"""
from __future__ import annotations

import asyncio
import secrets
from collections import Counter
from typing import cast

import pytest
from pump_harness import SIGNING_KEY, organism_yaml
from redis_server import RedisServer, TLSFiles, TLSRedisServer, block_server

from xml_pipeline.memory import BackendConfig, create_backend
from xml_pipeline.memory.async_store import RedisStore
from xml_pipeline.memory.redis_pipe import RedisPipe
from xml_pipeline.message_bus.local_pool import LocalWorkerPool
from xml_pipeline.message_bus.message import Message
from xml_pipeline.message_bus.stream_pump import StreamPump
from xml_pipeline.organism import Organism, parse_organism

LISTENERS = """
- {name: echo, handler: "xp_test_handlers:echo", cpu_bound: true}
- {name: fail, handler: "xp_test_handlers:fail", cpu_bound: true}
- {name: relay, handler: "xp_test_handlers:relay"}
"""


def organism(name: str) -> Organism:
    return parse_organism(organism_yaml(name=name, backend={"type": "redis"}, listeners=LISTENERS), environ={})


def backend_for(server: RedisServer, **config: object) -> object:
    return create_backend(BackendConfig(backend_type="redis", redis_url=server.url,
                                            redis_prefix=f"pp{secrets.token_hex(4)}:", redis_ttl=600,
                                            signing_key=SIGNING_KEY, **config))  # type: ignore[arg-type]


def tag_of(m: Message) -> str:
    el = m.element()
    assert el is not None, m
    found = el.find("echo") if el.tag != "echo" else el
    return (found if found is not None else el).get("tag", "")


@pytest.mark.parametrize("pipelined", [True, False], ids=["pipe", "io-threads"])
async def test_same_answers_and_buffer_with_and_without_the_pipe(redis_server: RedisServer, pipelined: bool) -> None:
    backend = backend_for(redis_server)
    pool = LocalWorkerPool(backend, workers=2)  # type: ignore[arg-type]
    pump = StreamPump(organism(f"pp{int(pipelined)}"), backend, dispatcher=pool, pipelined=pipelined)  # type: ignore[arg-type]
    assert (pump.pipe is not None) is pipelined
    async with pump:
        requests = ([Message("console", "echo", f'<e tag="e{i}"/>') for i in range(40)]
                    + [Message("console", "relay", f'<echo tag="r{i}"/>') for i in range(8)]
                    + [Message("console", "fail", "<f/>") for _ in range(4)])
        answers = await asyncio.wait_for(asyncio.gather(*(pump.request(m) for m in requests)), 120)
        # Every conversation answered once, by the right handler, to the right request.
        for m, outs in zip(requests, answers):
            assert len(outs) == 1 and outs[0].in_reply_to == m.id
            if m.to == "fail":
                assert outs[0].kind == "error" and "boom" in outs[0].payload
            else:
                assert outs[0].kind == "response"
                assert tag_of(outs[0]) == (m.element().get("tag") if m.element() is not None else "")  # type: ignore[union-attr]
        # Every message, request and reply, in the context buffer, each once. A reply travels on the
        # pruned chain's thread: echo's and fail's replies (and relay's final ones) on console, echo's
        # replies to relay on console.relay.
        reg = pump.registry
        threads = {chain: reg.get_or_create(f"system.{pump.organism.name}.{chain}")
                   for chain in ("console", "console.echo", "console.fail", "console.relay", "console.relay.echo")}
        senders = {chain: Counter(s.from_id for s in pump.buffer.get_thread_slots(t)) for chain, t in threads.items()}
        assert senders == {"console": {"echo": 40, "fail": 4, "relay": 8}, "console.echo": {"console": 40},
                           "console.fail": {"console": 4}, "console.relay": {"console": 8, "echo": 8},
                           "console.relay.echo": {"relay": 8}}
        if pipelined:
            assert pump.pipe is not None
            # The request's and the reply's append per echo/fail message (the local workers take the
            # message with the task: no temp keys). The 52 requests' appends share a few writes (the
            # replies' follow the workers' results, one or two at a time).
            assert pump.pipe.commands >= 2 * 44
            assert pump.pipe.writes + 40 <= pump.pipe.commands
    # Nothing left in the temp key space.
    assert list(redis_server.client().scan_iter(match=f"{backend.config.redis_prefix}tmp:*")) == []  # type: ignore[attr-defined]
    backend.close()  # type: ignore[attr-defined]


async def test_the_pump_serves_conversations_over_tls_on_its_pipe(tls_redis: TLSRedisServer, tls_files: TLSFiles,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # The test CA is trusted like a system CA, by the pump and by the worker processes it starts.
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_files.ca))
    backend = backend_for(tls_redis)
    pool = LocalWorkerPool(backend, workers=2)  # type: ignore[arg-type]
    pump = StreamPump(organism("pptls"), backend, dispatcher=pool)  # type: ignore[arg-type]
    assert pump.pipe is not None  # rediss:// keeps the pipe
    async with pump:
        # One conversation first: a fresh server learns the scripts (NOSCRIPT -> EVAL on the blocking path).
        (warm,) = await asyncio.wait_for(pump.request(Message("console", "echo", '<e tag="w"/>')), 60)
        assert warm.kind == "response"
        fallbacks = pump.stats.redis_fallbacks
        requests = [Message("console", "echo", f'<e tag="t{i}"/>') for i in range(30)]
        answers = await asyncio.wait_for(asyncio.gather(*(pump.request(m) for m in requests)), 120)
        for m, outs in zip(requests, answers):
            assert len(outs) == 1 and outs[0].kind == "response" and outs[0].in_reply_to == m.id
            assert tag_of(outs[0]) == m.element().get("tag")  # type: ignore[union-attr]
        # Every step went through the pipe, over TLS, and none fell back to the blocking backend.
        # (the 30 requests' appends share writes; the replies' follow the workers' results one by one)
        assert pump.pipe.commands >= 2 * 30 and pump.pipe.writes + 20 <= pump.pipe.commands
        assert pump.stats.redis_fallbacks == fallbacks
    backend.close()  # type: ignore[attr-defined]


@pytest.mark.parametrize("pipelined", [True, False], ids=["pipe", "io-threads"])
async def test_outage_with_messages_in_flight_ends_every_conversation(fresh_redis: RedisServer,
                                                                     pipelined: bool) -> None:
    backend = backend_for(fresh_redis, retries=1, socket_timeout=2.0, connect_timeout=0.5)
    pool = LocalWorkerPool(backend, workers=1)  # type: ignore[arg-type]
    async with StreamPump(organism("outage"), backend, dispatcher=pool, pipelined=pipelined) as pump:  # type: ignore[arg-type]
        (warm,) = await asyncio.wait_for(pump.request(Message("console", "echo", '<e tag="w"/>')), 60)
        assert warm.kind == "response"
        # The server stops reading, twenty conversations send their first step, the server dies.
        sleeper = await asyncio.to_thread(block_server, fresh_redis, 3.0)
        writes = pump.pipe.writes if pump.pipe is not None else 0
        ids = [await pump.inject(Message("console", "echo", f'<e tag="o{i}"/>')) for i in range(20)]
        for _ in range(50):  # until the steps are on their way (sequencing, not timing)
            await asyncio.sleep(0.01)
            if pump.pipe is None or pump.pipe.writes > writes:
                break
        assert fresh_redis.proc is not None
        fresh_redis.proc.kill()
        # Every conversation ends (with the backend's error logged, as on the blocking path).
        assert await pump.join(timeout=60), f"conversations still in flight: {pump.inflight}"
        assert len(ids) == 20
        if pipelined:
            assert pump.stats.redis_fallbacks >= 20  # each unconfirmed append went to the backend
        fresh_redis.proc.wait()
        fresh_redis.proc = None
        await asyncio.to_thread(sleeper.join, 5)
        fresh_redis.start()  # back (empty): the pump carries on without a restart
        (after,) = await asyncio.wait_for(pump.request(Message("console", "echo", '<e tag="after"/>')), 60)
        assert after.kind == "response" and tag_of(after) == "after"
    backend.close()  # type: ignore[attr-defined]


def test_the_pump_uses_a_pipe_only_where_it_can(redis_server: RedisServer) -> None:
    backend = backend_for(redis_server)
    assert isinstance(StreamPump(organism("a"), backend, dispatcher=None).pipe, RedisPipe)  # type: ignore[arg-type]
    assert StreamPump(organism("b"), backend, dispatcher=None, pipelined=False).pipe is None  # type: ignore[arg-type]
    backend.close()  # type: ignore[attr-defined]


async def test_dispatcher_submits_tasks_of_one_loop_iteration_in_one_multi(redis_server: RedisServer) -> None:
    from xml_pipeline.message_bus.dispatcher import RedisDispatcher
    from xml_pipeline.message_bus.worker_task import BACKEND_ERROR, WorkerResult, WorkerTask

    backend = backend_for(redis_server)
    client = redis_server.client()
    dispatcher = RedisDispatcher(backend)
    await dispatcher.start()
    try:
        pipe = cast(RedisStore, dispatcher.store).pipe  # the test counts what it sent
        assert pipe is not None
        tasks = [WorkerTask(f"t{i:02d}", "echo", "xp_test_handlers:echo", "a" * 32, "b" * 32) for i in range(30)]
        runs = [asyncio.ensure_future(dispatcher.run(t)) for t in tasks]
        tasks_key = dispatcher.streams.tasks
        for _ in range(500):  # until the MULTI went out (sequencing, not timing)
            await asyncio.sleep(0.01)
            if client.xlen(tasks_key) == 30:
                break
        assert pipe.writes == 1 and pipe.commands == 30 + 3  # MULTI, 30 XADD, EXPIRE, EXEC
        entries = client.xrange(tasks_key)
        assert [e[1][b"task_id"].decode() for e in entries] == [t.task_id for t in tasks]
        # What workers would send back: each caller gets its own result.
        for e in reversed(entries):
            reply_to = e[1][b"reply_to"]
            client.xadd(reply_to, WorkerResult(e[1][b"task_id"].decode(), response_key="c" * 32,  # type: ignore[arg-type]
                                               worker="w").to_fields())
        results = await asyncio.wait_for(asyncio.gather(*runs), 30)
        assert [r.task_id for r in results] == [t.task_id for t in tasks] and all(r.ok for r in results)
        # A submit Redis refuses (the stream key holds a string): every caller gets an error result.
        client.delete(tasks_key)
        client.set(tasks_key, "not a stream")
        failed = await asyncio.wait_for(asyncio.gather(*(dispatcher.run(
            WorkerTask(f"f{i}", "echo", "xp_test_handlers:echo", "a" * 32, "b" * 32)) for i in range(5))), 30)
        assert all(r.error_type == BACKEND_ERROR and "WRONGTYPE" in (r.error or "") for r in failed)
    finally:
        await dispatcher.close()
        backend.close()  # type: ignore[attr-defined]


@pytest.mark.parametrize("pipelined", [True, False], ids=["pipe", "io-threads"])
def test_the_dispatcher_submits_through_the_pumps_store_when_both_pipe(redis_server: RedisServer,
                                                                       pipelined: bool) -> None:
    from xml_pipeline.message_bus.dispatcher import RedisDispatcher

    backend = backend_for(redis_server)
    dispatcher = RedisDispatcher(backend)  # type: ignore[arg-type]
    own = dispatcher.store
    pump = StreamPump(organism("share"), backend, dispatcher=dispatcher, pipelined=pipelined)  # type: ignore[arg-type]
    # One group-commit connection for the pump's steps and the dispatcher's XADDs; without a pump
    # pipe the dispatcher keeps its own.
    assert (dispatcher.store is pump.store) is pipelined and (dispatcher.store is own) is not pipelined
    other = StreamPump(organism("other"), backend_for(redis_server), dispatcher=RedisDispatcher(backend))  # type: ignore[arg-type]
    assert other.dispatcher is not None and other.dispatcher.store is not other.store  # type: ignore[attr-defined]
    for p in (pump, other):
        p.store.close()
    own.close()
    backend.close()  # type: ignore[attr-defined]
    other.backend.close()
