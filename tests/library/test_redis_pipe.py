"""The pump's asyncio Redis pipe (group commit) and a worker's direct connection, on real redis-servers.

- Group commit: commands issued in one event-loop iteration leave in one write (counted), and every
  caller gets its own reply, in order.
- One bad command in a batch (a full thread, a key of the wrong type, a missing value) answers only
  its own caller; the others are stored and answered as usual.
- An outage with a batch in flight gives every waiting caller an error (no caller hangs); the pipe
  reconnects afterwards. A stalled server is given up on after socket_timeout.
- A worker's direct connection speaks the same protocol (password, retries, reconnect).
"""
from __future__ import annotations

import asyncio
import secrets
import threading

import pytest
from redis_server import RedisServer, block_server

from xml_pipeline.errors import BackendError, BackendUnavailable, ThreadFullError
from xml_pipeline.memory.config import BackendConfig
from xml_pipeline.memory.redis_backend import RedisBackend
from xml_pipeline.memory.protocol import Appended
from xml_pipeline.memory.redis_pipe import RedisPipe, Unsure

KEY = "pipe-tests-signing-key-0123456789abcdef"


def backend_on(server: RedisServer, **config: object) -> RedisBackend:
    cfg: dict[str, object] = dict(backend_type="redis", redis_url=server.url, redis_prefix=f"pp{secrets.token_hex(4)}:",
                                  signing_key=KEY, redis_ttl=600)
    cfg.update(config)
    return RedisBackend(BackendConfig(**cfg))  # type: ignore[arg-type]


def tid() -> str:
    return secrets.token_hex(16)


def load_scripts(backend: RedisBackend) -> None:
    """One blocking append: EVALSHA, NOSCRIPT, EVAL (what the pump's fallback does once per server)."""
    backend.buffer_append(tid(), backend.signer.sign(b"warm-up"))


async def test_group_commit_many_steps_in_few_writes(redis_server: RedisServer) -> None:
    backend = backend_on(redis_server)
    pipe = RedisPipe(backend)
    try:
        load_scripts(backend)
        assert await pipe.take(secrets.token_hex(16)) is None  # connected
        w0, c0 = pipe.writes, pipe.commands
        thread = tid()
        n = 60
        keys = [(secrets.token_hex(16), secrets.token_hex(16)) for _ in range(n)]
        outcomes = await asyncio.gather(*(
            pipe.append_at(thread, b"slot %d" % i, i, max_slots=None, append_id=f"a{i}",
                           items=[(keys[i][0], b"payload %d" % i), (keys[i][1], b"meta %d" % i)])
            for i in range(n)))
        indexes = [o.position for o in outcomes]
        assert {o.status for o in outcomes} == {"stored"}
        # One write carried all n appends (+ 2n puts): the loop issued them in one iteration.
        assert pipe.commands - c0 == 3 * n
        assert pipe.writes - w0 == 1
        assert sorted(indexes) == list(range(n))  # each caller got its own slot's index
        assert backend.buffer_thread_len(thread) == n
        taken = await asyncio.gather(*(pipe.take(k[0], k[1]) for k in keys))
        assert taken == [b"payload %d" % i for i in range(n)]
        assert pipe.writes - w0 == 2
        assert backend.temp_get_many([k for pair in keys for k in pair]) == [None] * (2 * n)  # deleted
        # Same append ids again: stored once (the backend's idempotent append), first indexes back.
        again = await pipe.append_at(thread, b"slot 7", n, max_slots=None, append_id="a7", items=[])
        assert again == Appended("repeat", indexes[7], b"slot 7")  # with the stored slot, to compare
        # A stale expected index: nothing stored, the thread's real length back.
        assert await pipe.append_at(thread, b"late", 3, max_slots=None, append_id="late", items=[]) == \
            Appended("moved", n)
        assert backend.buffer_thread_len(thread) == n
    finally:
        pipe.close()
        backend.close()


async def test_one_bad_command_in_a_batch_answers_only_its_caller(redis_server: RedisServer) -> None:
    backend = backend_on(redis_server)
    pipe = RedisPipe(backend)
    admin = redis_server.client()
    try:
        load_scripts(backend)
        full, wrong, good = tid(), tid(), tid()
        backend.buffer_append(full, backend.signer.sign(b"first"), max_slots=1)
        admin.set(backend.keys.buffer(wrong), b"not a list")  # the append script hits WRONGTYPE
        k = secrets.token_hex(16)
        backend.temp_put(k, b"value")
        assert await pipe.take(secrets.token_hex(16)) is None  # connected
        w0 = pipe.writes
        outcomes = await asyncio.gather(
            pipe.append_at(good, b"g0", 0, max_slots=5, append_id="g0", items=[]),
            pipe.append_at(full, b"f", 1, max_slots=1, append_id="f1", items=[(secrets.token_hex(16), b"x")]),
            pipe.append_at(wrong, b"w", 0, max_slots=5, append_id="w1", items=[]),
            pipe.take(secrets.token_hex(16)),  # nothing there: None, not an error
            pipe.take(k),
            pipe.append_at(good, b"g1", 1, max_slots=5, append_id="g1", items=[]),
            return_exceptions=True)
        assert pipe.writes - w0 == 1
        assert outcomes[0] == Appended("stored", 0) and outcomes[5] == Appended("stored", 1)
        assert isinstance(outcomes[1], Unsure) and isinstance(outcomes[2], Unsure)
        assert outcomes[3] is None and outcomes[4] == b"value"
        assert backend.buffer_thread_len(full) == 1 and backend.buffer_thread_len(good) == 2
        # What the pump does with Unsure: redo through the blocking backend, which raises the real error.
        with pytest.raises(ThreadFullError):
            backend.buffer_append_at(full, b"f", 1, max_slots=1, append_id="f1")
        with pytest.raises(BackendError, match="WRONGTYPE"):
            backend.buffer_append(wrong, b"w", max_slots=5, append_id="w1")
    finally:
        pipe.close()
        backend.close()


async def test_outage_with_a_batch_in_flight_fails_every_caller_then_reconnects(fresh_redis: RedisServer) -> None:
    backend = backend_on(fresh_redis, socket_timeout=5.0)
    pipe = RedisPipe(backend)
    try:
        # A fresh server does not know the script: the pipe says Unsure (NOSCRIPT), the blocking
        # path (the pump's fallback) runs EVAL, and from then on the pipe's EVALSHA works.
        thread = tid()
        with pytest.raises(Unsure, match="NoScript"):
            await pipe.append_at(thread, b"s0", 0, max_slots=None, append_id="s0", items=[])
        assert backend.buffer_append(thread, b"s0", append_id="s0") == 0
        assert await pipe.append_at(thread, b"s0", 0, max_slots=None, append_id="s0", items=[]) == \
            Appended("repeat", 0, b"s0")
        # The server stops reading (DEBUG SLEEP), a batch goes out, then the server dies under it.
        sleeper = await asyncio.to_thread(block_server, fresh_redis, 3.0)
        w0 = pipe.writes
        calls = [asyncio.ensure_future(pipe.append_at(thread, b"s%d" % i, i, max_slots=None,
                                                      append_id=f"s{i}", items=[])) for i in range(1, 11)]
        calls += [asyncio.ensure_future(pipe.take(secrets.token_hex(16))) for _ in range(5)]
        await asyncio.sleep(0)  # let them queue
        await asyncio.sleep(0)
        assert pipe.writes - w0 == 1 and all(not c.done() for c in calls)
        assert fresh_redis.proc is not None
        fresh_redis.proc.kill()
        outcomes = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 10)
        assert all(isinstance(o, Unsure) for o in outcomes[:10]), outcomes
        assert all(isinstance(o, BackendUnavailable) for o in outcomes[10:]), outcomes
        fresh_redis.proc.wait()
        fresh_redis.proc = None
        sleeper.join(5)
        # While it is down: a clear error, no hang.
        with pytest.raises(BackendUnavailable):
            await pipe.take(secrets.token_hex(16))
        fresh_redis.start()  # same port, empty data (no scripts either)
        k = secrets.token_hex(16)
        backend.temp_put(k, b"v")
        assert await pipe.take(k) == b"v"  # the pipe reconnected by itself
    finally:
        pipe.close()
        backend.close()


async def test_a_stalled_server_is_given_up_on_after_socket_timeout(fresh_redis: RedisServer) -> None:
    backend = backend_on(fresh_redis, socket_timeout=0.3)
    pipe = RedisPipe(backend)
    try:
        assert await pipe.take(secrets.token_hex(16)) is None  # connected
        sleeper = await asyncio.to_thread(block_server, fresh_redis, 1.5)
        outcomes = await asyncio.wait_for(asyncio.gather(
            pipe.take(secrets.token_hex(16)),
            pipe.append_at(tid(), b"s", 0, max_slots=None, append_id="x", items=[]),
            return_exceptions=True), 10)
        assert isinstance(outcomes[0], BackendUnavailable) and "TimeoutError" in str(outcomes[0])
        assert isinstance(outcomes[1], Unsure)
        await asyncio.to_thread(sleeper.join, 5)
        assert await pipe.take(secrets.token_hex(16)) is None  # a new connection works
    finally:
        pipe.close()
        backend.close()


async def test_pipe_authenticates_like_the_pool(redis_factory: type[RedisServer]) -> None:
    server = redis_factory(password="pipe-secret-123").start()
    good = backend_on(server, redis_password="pipe-secret-123")
    bad = backend_on(server, redis_password="wrong-password", retries=0)
    pipe, bad_pipe = RedisPipe(good), RedisPipe(bad)
    try:
        load_scripts(good)
        assert await pipe.append_at(tid(), b"s", 0, max_slots=None, append_id="a", items=[]) == Appended("stored", 0)
        with pytest.raises(BackendUnavailable) as e:
            await bad_pipe.take(secrets.token_hex(16))
        assert "wrong-password" not in str(e.value)
    finally:
        pipe.close()
        bad_pipe.close()
        good.close()
        bad.close()


def test_for_backend_on_every_redis_url_but_not_other_backends(redis_server: RedisServer) -> None:
    backend = backend_on(redis_server)
    tls = RedisBackend(BackendConfig(backend_type="redis", redis_url=f"rediss://127.0.0.1:{redis_server.port}/0",
                                     redis_prefix="tls:", signing_key=KEY))
    try:
        assert isinstance(RedisPipe.for_backend(backend), RedisPipe)
        assert isinstance(RedisPipe.for_backend(tls), RedisPipe)  # TLS keeps the fast path (test_redis_tls.py)
        assert RedisPipe.for_backend(object()) is None
        tls.close()
        assert RedisPipe.for_backend(tls) is None and tls.new_direct_connection() is None
    finally:
        backend.close()
        tls.close()


def test_direct_connection_same_results_own_socket_and_reconnects(fresh_redis: RedisServer) -> None:
    backend = backend_on(fresh_redis, retries=20)
    try:
        backend.use_direct_connection()
        direct = backend._direct  # noqa: SLF001 - the test looks at what carried the commands
        assert direct is not None
        keys = [secrets.token_hex(16) for _ in range(3)]
        backend.temp_put_many([(k, b"v" + k.encode()) for k in keys])
        assert backend.temp_get_many(keys) == [b"v" + k.encode() for k in keys]
        assert backend.temp_take(keys[0], keys[1]) == b"v" + keys[0].encode()
        assert direct.round_trips == 3
        # Another thread keeps using the pool.
        got: list[object] = []
        t = threading.Thread(target=lambda: got.append(backend.temp_get_many([keys[2]])))
        t.start()
        t.join()
        assert got == [[b"v" + keys[2].encode()]] and direct.round_trips == 3
        # The server goes away and comes back: the backend's retries carry the call over.
        fresh_redis.restart()
        backend.temp_put_many([(keys[0], b"again")])
        assert backend.temp_get_many([keys[0]]) == [b"again"]
    finally:
        backend.close()


def test_direct_connection_outage_is_backend_unavailable(fresh_redis: RedisServer) -> None:
    backend = backend_on(fresh_redis, retries=1)
    try:
        backend.use_direct_connection()
        backend.temp_put_many([(secrets.token_hex(16), b"v")])
        fresh_redis.stop()
        with pytest.raises(BackendUnavailable, match="after 2 attempt"):
            backend.temp_get_many([secrets.token_hex(16)])
    finally:
        backend.close()


def test_direct_connection_with_a_password(redis_factory: type[RedisServer]) -> None:
    server = redis_factory(password="direct-secret-1").start()
    backend = backend_on(server, redis_password="direct-secret-1")
    try:
        backend.use_direct_connection()
        k = secrets.token_hex(16)
        backend.temp_put_many([(k, b"v")])
        assert backend.temp_get_many([k]) == [b"v"]
        assert backend._direct is not None and backend._direct.round_trips == 2  # noqa: SLF001
    finally:
        backend.close()
