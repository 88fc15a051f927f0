"""RedisBackend when the network or the server misbehaves, on real redis-server processes:
a retried append after a timeout is stored once (where a naive retried RPUSH is stored twice),
and a server that goes away and comes back is handled by the same backend object."""
from __future__ import annotations

import secrets
import threading
from collections.abc import Callable
from typing import Any

import pytest
import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry
from redis_server import RedisServer, block_server

from xml_pipeline.errors import BackendUnavailable
from xml_pipeline.memory.config import BackendConfig
from xml_pipeline.memory.redis_backend import RedisBackend

KEY = "test-signing-key-0123456789abcdef"
SLEEP = 1.0      # seconds the server is blocked by DEBUG SLEEP
TIMEOUT = 0.2    # client socket timeout, well below SLEEP: the first attempt must time out
RETRIES = 10     # enough attempts to outlast the stall


def evalsha_calls(client: redis.Redis) -> int:
    stats = client.info("commandstats")
    return sum(stats.get(k, {}).get("calls", 0) for k in ("cmdstat_evalsha", "cmdstat_eval"))


def test_naive_retried_rpush_stores_twice_ours_once(fresh_redis: RedisServer) -> None:
    admin = fresh_redis.client()
    # The naive design: a plain RPUSH with redis-py's automatic retry, given enough retries to outlast
    # the stall (exactly what our backend gets below).
    naive = fresh_redis.client(socket_timeout=TIMEOUT, retry=Retry(ExponentialWithJitterBackoff(), RETRIES))
    naive.ping()  # connected before the server blocks, so the first RPUSH really goes out
    sleeper = block_server(fresh_redis, SLEEP)
    try:
        naive.rpush("naive:buffer:{t}", b"slot")
    except redis.RedisError:
        pass  # every attempt may time out; what matters is what the server stored
    sleeper.join()
    assert admin.llen("naive:buffer:{t}") >= 2, "the naive retry should have stored the slot twice"

    backend = RedisBackend(BackendConfig(backend_type="redis", redis_url=fresh_redis.url, redis_prefix="ours:",
                                         signing_key=KEY, socket_timeout=TIMEOUT, retries=RETRIES))
    backend.buffer_append("t", b"first")  # loads the script and warms the pool
    before = evalsha_calls(admin)
    sleeper = block_server(fresh_redis, SLEEP)
    try:
        index: int | None = backend.buffer_append("t", b"retried")
    except BackendUnavailable:
        index = None  # all attempts timed out; the server still ran them all
    sleeper.join()
    attempts = evalsha_calls(admin) - before
    assert attempts >= 2, "the append was expected to be retried after the timeout"
    assert backend.buffer_get_thread("t") == [b"first", b"retried"]  # stored once
    assert index in (1, None)
    backend.close()


def test_outage_raises_clearly_and_the_same_backend_recovers(redis_factory: type[RedisServer]) -> None:
    password = "outage-pw-" + secrets.token_hex(6)
    server = redis_factory(password=password).start()
    cfg = BackendConfig(backend_type="redis", redis_url=server.url, redis_prefix="outage:", signing_key=KEY,
                        redis_password=password, retries=2, connect_timeout=0.5, socket_timeout=1.0)
    backend = RedisBackend(cfg)
    # The same server reached through a URL that carries the password: it must be redacted too.
    leaky = RedisBackend(cfg.replace(redis_url=f"redis://:{password}@127.0.0.1:{server.port}/0",
                                     redis_password=None))

    def work(i: int) -> None:
        backend.buffer_append("t", b"%d" % i)
        backend.buffer_get_thread("t")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()  # several pooled connections now exist, all of which the outage will break
    assert backend.buffer_thread_len("t") == 4 and leaky.ping()

    server.stop()
    assert backend.ping() is False and leaky.ping() is False
    ops: list[Callable[[], Any]] = [
        lambda: backend.buffer_append("t", b"x"),
        lambda: backend.buffer_get_thread("t"),
        lambda: backend.registry_set("c.d", "t"),
        lambda: backend.registry_get_uuid("c.d"),
        backend.buffer_list_threads,
        backend.info,
        lambda: backend.temp_put("k", b"v"),
    ]
    for op in ops:
        with pytest.raises(BackendUnavailable) as info:
            op()
        message = str(info.value)
        assert f"127.0.0.1:{server.port}" in message and "after 3 attempt(s)" in message
        assert password not in message
    with pytest.raises(BackendUnavailable) as info:
        leaky.buffer_get_thread("t")
    assert f"redis://:***@127.0.0.1:{server.port}/0" in str(info.value)
    assert password not in str(info.value)

    server.start()  # same port, same password, empty data (no persistence)
    assert backend.ping() is True
    results: list[object] = []

    def again() -> None:
        try:
            results.append(backend.buffer_append("t", b"after"))
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            results.append(e)

    threads = [threading.Thread(target=again) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [0, 1, 2, 3]  # type: ignore[type-var]
    backend.registry_set("c.d", "t")
    assert backend.registry_get_chain("t") == "c.d"
    assert leaky.buffer_thread_len("t") == 4
    backend.close()
    leaky.close()
