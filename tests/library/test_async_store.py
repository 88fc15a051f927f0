"""The async store (memory/store.py) on every backend: memory, manager and a real redis-server.

- The batch operations: a prepared slot appended with the worker's temp inputs in one step, a take
  that returns the value and deletes every key named, a delete; many appends to one thread at once
  land at consecutive indices, each once; a full thread raises ThreadFullError and stores no inputs.
- On Redis, with the pipe and without it: an append whose answer the pipe cannot confirm (the
  reply overdue, the connection killed) is redone through the blocking backend and stored once; a
  script or function library flushed between calls (NOSCRIPT) is reloaded by the fallback; Redis
  going away fails the calls with BackendUnavailable and the store works again once it is back;
  the streams' commands (a MULTI of XADDs, an XREAD BLOCK) answer as Redis does.
"""
from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator

import pytest

from redis_server import RedisServer, block_server

from xml_pipeline.errors import BackendUnavailable, ThreadFullError
from xml_pipeline.memory import BackendConfig, SharedBackend
from xml_pipeline.memory.async_store import RedisStore, ThreadedStore, open_store, open_stream_store
from xml_pipeline.memory.context_buffer import ContextBuffer
from xml_pipeline.memory.redis_backend import RedisBackend
from xml_pipeline.memory.store import AsyncStore, StreamStore
from xml_pipeline.memory.store_io import IoThreads

SIGNING_KEY = "async-store-tests-signing-key-0123456789"
PIPE = [True, False]
PIPE_IDS = ["pipe", "io-threads"]


def tid() -> str:
    return secrets.token_hex(16)


def signed(backend: SharedBackend, n: int) -> list[tuple[str, bytes]]:
    return [(tid(), backend.signer.sign(b"value-%d" % i)) for i in range(n)]


@pytest.fixture
async def store_of(any_backend: SharedBackend) -> AsyncIterator[AsyncStore]:
    store = open_store(any_backend)
    yield store
    store.close()


async def test_append_with_inputs_take_and_delete(any_backend: SharedBackend, store_of: AsyncStore) -> None:
    store, backend = store_of, any_backend
    assert isinstance(store, RedisStore if isinstance(backend, RedisBackend) else ThreadedStore)
    assert isinstance(store, AsyncStore) and store.backend is backend
    buffer = ContextBuffer(backend)
    thread = tid()
    items = signed(backend, 2)
    slot = await store.append(buffer, buffer.prepare(thread, "first", "console", "echo", append_id="m1"), items)
    assert slot.metadata.slot_index == 0 and slot.payload == "first"
    # The inputs went with the append, as the blocking batches read them back.
    assert backend.temp_get_many([k for k, _ in items]) == [v for _, v in items]
    # take: the value, and every key named is gone; delete counts what it removed.
    extra = signed(backend, 1)
    backend.temp_put_many(extra)
    assert await store.take(items[0][0], items[1][0]) == items[0][1]
    assert backend.temp_get_many([items[0][0], items[1][0]]) == [None, None]
    assert await store.take(items[0][0]) is None
    assert await store.delete(extra[0][0], tid()) == 1
    assert backend.temp_get(extra[0][0]) is None
    # Many appends to one thread at once: consecutive indices, each slot once.
    slots = await asyncio.gather(*(store.append(buffer, buffer.prepare(thread, f"m{i}", "console", "echo",
                                                                       append_id=f"id{i}")) for i in range(20)))
    assert sorted(s.metadata.slot_index for s in slots) == list(range(1, 21))
    assert [s.payload for s in buffer.get_thread_slots(thread)][1:] == [s.payload for s in
                                                                        sorted(slots, key=lambda s: s.metadata.slot_index)]
    # A repeated append (same id, same slot) is recognised and stores nothing.
    again = await store.append(buffer, buffer.prepare(thread, "m3", "console", "echo", append_id="id3"))
    assert again.metadata.slot_index == next(s.metadata.slot_index for s in slots if s.payload == "m3")
    assert buffer.thread_len(thread) == 21
    # Any blocking step: run.
    assert await store.run(backend.buffer_thread_len, thread) == 21
    assert store.fallbacks == 0


async def test_a_full_thread_raises_and_stores_no_inputs(any_backend: SharedBackend, store_of: AsyncStore) -> None:
    buffer = ContextBuffer(any_backend, max_slots_per_thread=2)
    thread = tid()
    for i in range(2):
        await store_of.append(buffer, buffer.prepare(thread, f"s{i}", "console", "echo", append_id=f"s{i}"))
    items = signed(any_backend, 2)
    with pytest.raises(ThreadFullError):
        await store_of.append(buffer, buffer.prepare(thread, "over", "console", "echo", append_id="over"), items)
    assert any_backend.temp_get_many([k for k, _ in items]) == [None, None]
    assert buffer.thread_len(thread) == 2


async def test_io_threads_batch_outcomes_and_raise_errors() -> None:
    io = IoThreads(4)
    try:
        assert await asyncio.gather(*(io.run(pow, i, 2) for i in range(200))) == [i * i for i in range(200)]
        with pytest.raises(ZeroDivisionError):
            await io.run(divmod, 1, 0)
    finally:
        io.close()


# -- Redis: the fallback, NOSCRIPT, an outage; with the pipe and without ---------------------------------
def redis_on(server: RedisServer, **config: object) -> RedisBackend:
    cfg: dict[str, object] = dict(backend_type="redis", redis_url=server.url, redis_prefix=f"as{secrets.token_hex(4)}:",
                                  signing_key=SIGNING_KEY, redis_ttl=600)
    cfg.update(config)
    return RedisBackend(BackendConfig(**cfg))  # type: ignore[arg-type]


@pytest.mark.parametrize("pipelined", PIPE, ids=PIPE_IDS)
async def test_unconfirmed_appends_are_redone_and_stored_once(fresh_redis: RedisServer, pipelined: bool) -> None:
    # The pipe gives up on a reply overdue by socket_timeout; the server answers later anyway.
    backend = redis_on(fresh_redis, socket_timeout=0.5, retries=3)
    store = open_store(backend, pipelined=pipelined)
    buffer = ContextBuffer(backend)
    thread = tid()
    try:
        for warm in ("warm", "warm-pipe"):  # the first goes through the backend, the second opens the pipe
            await store.append(buffer, buffer.prepare(thread, warm, "console", "echo", append_id=warm))
        items = [signed(backend, 2) for _ in range(10)]  # ready before the block: it lasts only 1.2 s
        sleeper = await asyncio.to_thread(block_server, fresh_redis, 1.2)
        slots = await asyncio.gather(*(store.append(buffer, buffer.prepare(thread, f"m{i}", "console", "echo",
                                                                           append_id=f"m{i}"), items[i])
                                       for i in range(10)))
        await asyncio.to_thread(sleeper.join, 5)
        assert sorted(s.metadata.slot_index for s in slots) == list(range(2, 12))
        assert [s.payload for s in buffer.get_thread_slots(thread)] == ["warm", "warm-pipe"] + [
            s.payload for s in sorted(slots, key=lambda s: s.metadata.slot_index)]
        assert all(backend.temp_get_many([k for k, _ in it]) == [v for _, v in it] for it in items)
        if pipelined:
            assert store.fallbacks >= 10  # each append the pipe gave up on went to the backend
        else:
            assert store.fallbacks == 0
    finally:
        store.close()
        backend.close()


@pytest.mark.parametrize("pipelined", PIPE, ids=PIPE_IDS)
async def test_appends_on_a_killed_connection_are_redone_and_stored_once(fresh_redis: RedisServer,
                                                                         pipelined: bool) -> None:
    # The server holds writes (CLIENT PAUSE WRITE), the appends go out, their connection is killed:
    # nothing answers them, so each is redone through the blocking backend once the pause ends.
    backend = redis_on(fresh_redis, retries=3)
    store = open_store(backend, pipelined=pipelined)
    buffer = ContextBuffer(backend)
    raw = fresh_redis.client()
    thread = tid()
    try:
        for warm in ("warm", "warm-pipe"):  # the first goes through the backend, the second opens the pipe
            await store.append(buffer, buffer.prepare(thread, warm, "console", "echo", append_id=warm))
        pipe = store.pipe if isinstance(store, RedisStore) else None
        writes = pipe.writes if pipe is not None else 0
        raw.execute_command("CLIENT", "PAUSE", 1500, "WRITE")
        appends = asyncio.gather(*(store.append(buffer, buffer.prepare(thread, f"k{i}", "console", "echo",
                                                                       append_id=f"k{i}")) for i in range(10)))
        for _ in range(200):  # until the appends were written (sequencing, not timing)
            await asyncio.sleep(0.01)
            if pipe is None or pipe.writes > writes:
                break
        await asyncio.sleep(0.05)
        raw.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
        slots = await asyncio.wait_for(appends, 30)
        assert sorted(s.metadata.slot_index for s in slots) == list(range(2, 12))
        assert buffer.thread_len(thread) == 12
        assert [s.payload for s in buffer.get_thread_slots(thread)][2:] == [
            s.payload for s in sorted(slots, key=lambda s: s.metadata.slot_index)]
        assert store.fallbacks == (10 if pipelined else 0)
    finally:
        raw.close()
        store.close()
        backend.close()


@pytest.mark.parametrize("pipelined", PIPE, ids=PIPE_IDS)
@pytest.mark.parametrize("flush", ["SCRIPT", "FUNCTION"])
async def test_a_flushed_script_is_reloaded(fresh_redis: RedisServer, pipelined: bool, flush: str) -> None:
    backend = redis_on(fresh_redis)
    store = open_store(backend, pipelined=pipelined)
    buffer = ContextBuffer(backend)
    raw = fresh_redis.client()
    thread = tid()
    try:
        await store.append(buffer, buffer.prepare(thread, "before", "console", "echo", append_id="b"))
        mechanism = backend.script_mechanism
        raw.execute_command(flush, "FLUSH")
        slot = await store.append(buffer, buffer.prepare(thread, "after", "console", "echo", append_id="a"),
                                  signed(backend, 1))
        assert slot.metadata.slot_index == 1
        fallbacks = store.fallbacks
        # The pipe meets the flushed mechanism's error once and hands the append to the backend.
        hit = flush == ("FUNCTION" if mechanism == "fcall" else "SCRIPT")
        assert fallbacks == (1 if pipelined and hit else 0)
        # Reloaded: the next append goes through without any fallback.
        await store.append(buffer, buffer.prepare(thread, "next", "console", "echo", append_id="n"))
        assert store.fallbacks == fallbacks
        assert [s.payload for s in buffer.get_thread_slots(thread)] == ["before", "after", "next"]
    finally:
        raw.close()
        store.close()
        backend.close()


@pytest.mark.parametrize("pipelined", PIPE, ids=PIPE_IDS)
async def test_redis_going_away_and_coming_back(fresh_redis: RedisServer, pipelined: bool) -> None:
    backend = redis_on(fresh_redis, retries=1, socket_timeout=1.0, connect_timeout=0.3)
    store = open_store(backend, pipelined=pipelined)
    buffer = ContextBuffer(backend)
    thread = tid()
    try:
        await store.append(buffer, buffer.prepare(thread, "up", "console", "echo", append_id="up"))
        fresh_redis.stop()
        with pytest.raises(BackendUnavailable):
            await store.append(buffer, buffer.prepare(thread, "down", "console", "echo", append_id="down"))
        with pytest.raises(BackendUnavailable):
            await store.take(tid(), tid())
        with pytest.raises(BackendUnavailable):
            await store.delete(tid())
        fresh_redis.start()  # back, empty: the store reconnects on its own
        slot = await store.append(buffer, buffer.prepare(thread, "again", "console", "echo", append_id="again"))
        assert slot.payload == "again"
        items = signed(backend, 1)
        backend.temp_put_many(items)
        assert await store.take(items[0][0]) == items[0][1]
    finally:
        store.close()
        backend.close()


@pytest.mark.parametrize("pipelined", PIPE, ids=PIPE_IDS)
async def test_stream_commands(redis_server: RedisServer, pipelined: bool) -> None:
    backend = redis_on(redis_server)
    store = open_stream_store(backend, pipelined=pipelined)
    assert isinstance(store, StreamStore)
    assert (store.pipe is not None) is pipelined
    stream = f"{backend.config.redis_prefix}stream:{tid()}"
    try:
        replies = await store.execute([("MULTI",), ("XADD", stream, "*", "n", "1"), ("XADD", stream, "*", "n", "2"),
                                       ("EXEC",)], what="submit")
        assert replies[:3] == [b"OK", b"QUEUED", b"QUEUED"] and len(replies[3]) == 2
        (read,) = await store.read([("XREAD", "COUNT", 10, "BLOCK", 100, "STREAMS", stream, "0-0")], what="read")
        ((name, entries),) = read
        assert [e[1] for e in entries] == [[b"n", b"1"], [b"n", b"2"]]
        # An XREAD BLOCK that waits does not hold up the other commands.
        waiting = asyncio.ensure_future(store.read([("XREAD", "BLOCK", 2000, "STREAMS", stream, "$")], what="read"))
        await asyncio.sleep(0.05)
        (n,) = await store.execute([("XLEN", stream)], what="len")
        assert n == 2 and not waiting.done()
        await store.execute([("XADD", stream, "*", "n", "3")], what="add")
        (woken,) = await asyncio.wait_for(waiting, 5)
        assert woken[0][1][0][1] == [b"n", b"3"]
        # An error reply comes back in its place.
        (_, wrong) = await store.execute([("SET", f"{stream}:s", "x"), ("XLEN", f"{stream}:s")], what="wrong")
        assert isinstance(wrong, Exception) and "WRONGTYPE" in str(wrong)
    finally:
        store.close()
        backend.close()

