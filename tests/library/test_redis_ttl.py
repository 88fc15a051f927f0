"""Sliding TTL on a real redis-server: idle threads vanish with their registry entries, active ones
survive, and after any mix of operations no key of ours exists without an expiry."""
from __future__ import annotations

import secrets
import time

import pytest
import redis
from redis_server import RedisServer

from xml_pipeline.errors import ThreadFullError
from xml_pipeline.memory.config import BackendConfig
from xml_pipeline.memory.keys import glob_escape
from xml_pipeline.memory.redis_backend import DEFAULT_TEMP_TTL, RedisBackend

KEY = "test-signing-key-0123456789abcdef"


def make(server: RedisServer, ttl: int) -> RedisBackend:
    return RedisBackend(BackendConfig(backend_type="redis", redis_url=server.url, signing_key=KEY,
                                      redis_prefix=f"ttl{secrets.token_hex(4)}:", redis_ttl=ttl))


def ttls(raw: redis.Redis, prefix: str) -> dict[str, int]:
    return {k.decode(): raw.ttl(k) for k in raw.scan_iter(match=glob_escape(prefix) + "*", count=1000)}


def test_idle_threads_vanish_active_ones_survive(redis_server: RedisServer, raw: redis.Redis) -> None:
    b = make(redis_server, ttl=2)
    try:
        for t in ("idle", "active"):
            b.buffer_append(t, b"0")
            b.registry_set(f"root.{t}", t)
        written = 1
        # Keep writing to "active" every 0.5 s (never the registry) until "idle" has expired.
        give_up = time.monotonic() + 15  # a bound so a broken TTL fails instead of hanging
        while b.buffer_thread_exists("idle") or b.registry_get_uuid("root.idle") is not None:
            assert time.monotonic() < give_up, "the idle thread never expired"
            time.sleep(0.5)
            b.buffer_append("active", b"%d" % written)
            written += 1
        assert written >= 3  # "active" outlived at least one full TTL of "idle"
        keys = ttls(raw, b.config.redis_prefix)
        assert not [k for k in keys if "idle" in k], keys  # buffer, op, uuid and chain keys: all gone
        # The active thread's buffer AND its registry entries were kept alive by the appends alone.
        assert b.buffer_get_thread("active") == [b"%d" % i for i in range(written)]
        assert b.registry_get_uuid("root.active") == "active"
        assert b.registry_get_chain("active") == "root.active"
        assert all(0 < ttl <= 2 for ttl in keys.values()), keys
        # Listing goes through the index (no SCAN): the expired thread and mapping are not listed,
        # and listing dropped their index entries.
        assert b.buffer_list_threads() == ["active"]
        assert b.registry_list_all() == {"active": "root.active"}
        assert raw.smembers(b.keys.index()) == {b"t:active", b"c:root.active"}
    finally:
        b.buffer_clear()
        b.registry_clear()
        b.close()


def test_every_key_has_a_ttl_after_a_mixed_workload(redis_server: RedisServer, raw: redis.Redis) -> None:
    b = make(redis_server, ttl=300)
    try:
        for i in range(20):
            b.buffer_append(f"t{i % 4}", b"x", append_id=f"id{i}")
        b.buffer_append("t0", b"x", append_id="id0")  # a deduplicated retry
        for i in range(3):
            b.buffer_append("full", b"x", max_slots=3)
        with pytest.raises(ThreadFullError):
            b.buffer_append("full", b"x", max_slots=3)
        b.registry_set("a.b", "t0")
        b.registry_set("a.b", "t1")           # moves the chain (stale reverse removed)
        b.registry_set("a.c", "t1")           # moves the uuid (stale forward removed)
        b.registry_get_or_create("a.c", "zz")  # hit
        b.registry_get_or_create("a.d", "t2")  # miss
        b.registry_set("x.y", "t3")
        b.registry_delete("t3")
        b.registry_set("no.buffer", "u-without-buffer")
        b.temp_put("payload", b"p")
        b.temp_put("short", b"p", ttl=10)
        b.buffer_delete_thread("t3")
        keys = ttls(raw, b.config.redis_prefix)
        assert len(keys) >= 12, keys
        no_ttl = {k: t for k, t in keys.items() if not 0 < t <= 300}
        assert no_ttl == {}, f"keys without a TTL: {no_ttl}"
    finally:
        b.buffer_clear()
        b.registry_clear()
        b.temp_delete("payload", "short")
        b.close()


def test_without_ttl_nothing_expires_but_temp_data(redis_server: RedisServer, raw: redis.Redis) -> None:
    b = make(redis_server, ttl=0)
    try:
        b.buffer_append("t", b"x")
        b.registry_set("a.b", "t")
        b.temp_put("payload", b"p")
        keys = ttls(raw, b.config.redis_prefix)
        p = b.config.redis_prefix
        assert keys[f"{p}buffer:{{t}}"] == -1 and keys[f"{p}chain:a.b"] == -1 and keys[f"{p}uuid:{{t}}"] == -1
        assert 0 < keys[f"{p}tmp:{{payload}}"] <= DEFAULT_TEMP_TTL
    finally:
        b.buffer_clear()
        b.registry_clear()
        b.temp_delete("payload")
        b.close()
