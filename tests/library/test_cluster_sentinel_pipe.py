"""The fast path on Sentinel: the pump's RedisPipe and a worker's DirectConnection connect to the
master the sentinels name, and after a failover (a demoted master answering READONLY, or a dead one)
the next command reaches the new master without the caller seeing an error."""
from __future__ import annotations

import asyncio
import secrets
import time

import pytest
import redis
from redis_cluster import LocalSentinel
from redis_server import RedisServer

from xml_pipeline.memory import BackendConfig
from xml_pipeline.memory.redis_backend import RedisBackend
from xml_pipeline.memory.redis_pipe import RedisPipe

pytestmark = pytest.mark.cluster


def _demoted(old: RedisServer) -> None:
    """Wait until the sentinels turned the old master into a replica (until then it still takes
    writes: the window every Sentinel failover has, which min-replicas-to-write narrows)."""
    deadline = time.monotonic() + 20
    while True:
        try:
            if old.client().info("replication")["role"] == "slave":
                return
        except redis.ConnectionError:  # the role switch closes the server's client connections
            pass
        assert time.monotonic() < deadline, "the old master was never demoted"
        time.sleep(0.05)


def _backend(url: str) -> RedisBackend:
    return RedisBackend(BackendConfig(backend_type="redis", redis_url=url, redis_prefix=f"sp{secrets.token_hex(4)}:",
                                      redis_ttl=600, signing_key="sentinel-pipe-tests-key-0123456789",
                                      socket_timeout=1.0, connect_timeout=0.5))


@pytest.mark.parametrize("kill", [False, True])
def test_the_pipe_follows_a_failover(redis_sentinel: LocalSentinel, kill: bool) -> None:
    backend = _backend(redis_sentinel.url)

    async def run() -> list[object]:
        pipe = RedisPipe.for_backend(backend)
        assert pipe is not None
        try:
            first = await pipe.execute(backend.pack_commands([("SET", backend.keys.tmp("a"), "1")]), 1)
            old = redis_sentinel.current_master()
            new = redis_sentinel.failover(kill=kill)
            if not kill:
                _demoted(old)
            replies: list[object] = []
            for i in range(40):  # until a write lands on the new master (READONLY / a lost connection first)
                try:
                    (reply,) = await pipe.execute(backend.pack_commands([("SET", backend.keys.tmp(f"b{i}"), "2")]), 1)
                except Exception as e:  # noqa: BLE001 - what the pump's store falls back on
                    reply = e
                replies.append(reply)
                if reply == b"OK":
                    break
                await asyncio.sleep(0.1)
            assert new.client().exists(backend.keys.tmp(f"b{len(replies) - 1}")) == 1
            return [first, *replies]
        finally:
            pipe.close()

    replies = asyncio.run(run())
    assert replies[0] == [b"OK"] and replies[-1] == b"OK"
    # At most the command in flight when the master changed fails; then the pipe is on the new master.
    assert len(replies) <= 3, replies
    backend.close()


def test_a_direct_connection_follows_a_failover(redis_sentinel: LocalSentinel) -> None:
    backend = _backend(redis_sentinel.url)
    backend.use_direct_connection()
    assert backend._direct is not None  # noqa: SLF001 - the path under test
    backend.temp_put_many([("d1", b"1")])
    old = redis_sentinel.current_master()
    # On the replica before the failover (asynchronous replication could otherwise lose it: not
    # what this test is about).
    deadline = time.monotonic() + 20
    while not all(r.client().exists(backend.keys.tmp("d1")) for r in redis_sentinel.replicas):
        assert time.monotonic() < deadline, "d1 never reached the replica"
        time.sleep(0.05)
    new = redis_sentinel.failover(kill=False)
    _demoted(old)  # it answers READONLY from now on
    backend.temp_put_many([("d2", b"2")])  # retried on a new connection to the new master
    assert new.client().get(backend.keys.tmp("d2")) == b"2"
    assert backend.temp_get_many(["d1", "d2"]) == [b"1", b"2"]
    backend.close()
