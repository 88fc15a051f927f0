"""The thread index (`meta:index`) on a real redis-server: how the Redis backend lists, counts and
clears a prefix without SCAN (which Redis ACLs cannot confine to a prefix, so tenants' users are
not granted it). Each test fails on a backend whose index misses, keeps or loses entries."""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
import redis

from xml_pipeline.memory.redis_backend import RedisBackend


@pytest.fixture
def backend(make_backend: Callable[..., Any]) -> RedisBackend:
    b: RedisBackend = make_backend("redis")
    return b


@pytest.fixture
def short_lived(make_backend: Callable[..., Any]) -> RedisBackend:
    """A backend whose threads expire after 1 s of inactivity."""
    b: RedisBackend = make_backend("redis", redis_ttl=1)
    return b


def test_index_follows_threads_and_mappings(backend: RedisBackend, raw: redis.Redis) -> None:
    idx = backend.keys.index()
    for t in ("a", "b", "c"):
        backend.buffer_append(t, b"1")
        backend.buffer_append(t, b"2")  # a second append adds nothing
    backend.registry_set("x.y", "a")
    backend.registry_get_or_create("x.z", "b")
    backend.registry_get_or_create("x.z", "other")  # a hit adds nothing
    assert raw.smembers(idx) == {b"t:a", b"t:b", b"t:c", b"c:x.y", b"c:x.z"}
    backend.registry_set("x.y", "c")       # the chain moves: its entry stays
    backend.registry_set("x.w", "c")       # the uuid moves: x.y's mapping is gone, so is its entry
    assert raw.smembers(idx) == {b"t:a", b"t:b", b"t:c", b"c:x.z", b"c:x.w"}
    assert backend.registry_delete("b") and backend.buffer_delete_thread("a")
    assert raw.smembers(idx) == {b"t:b", b"t:c", b"c:x.w"}
    assert backend.buffer_list_threads() == ["b", "c"]
    assert backend.registry_list_all() == {"c": "x.w"}
    info = backend.info()
    assert (info["buffer_threads"], info["registry_entries"]) == (2, 1)
    assert backend.buffer_clear() == 2 and backend.registry_clear() == 1
    assert not raw.exists(idx)
    assert not list(raw.scan_iter(match=backend.config.redis_prefix + "*"))


def test_listing_drops_entries_whose_keys_are_gone(backend: RedisBackend, raw: redis.Redis) -> None:
    for t in ("keep", "gone"):
        backend.buffer_append(t, b"x")
        backend.registry_set(f"r.{t}", t)
    # What an expiry does: the keys disappear behind the index's back.
    raw.delete(backend.keys.buffer("gone"), backend.keys.chain("r.gone"))
    assert backend.buffer_list_threads() == ["keep"]
    assert backend.registry_list_all() == {"keep": "r.keep"}
    assert raw.smembers(backend.keys.index()) == {b"t:keep", b"c:r.keep"}
    # A thread that comes back is indexed again by its first append.
    backend.buffer_append("gone", b"again")
    assert backend.buffer_list_threads() == ["gone", "keep"]


def test_dead_entries_are_sampled_away_without_listing(short_lived: RedisBackend, raw: redis.Redis) -> None:
    """Nobody lists: each new entry samples two others and drops dead ones, so a busy organism's
    index does not grow with every thread it ever had."""
    b = short_lived
    for i in range(200):
        b.buffer_append(f"old{i}", b"x")
    deadline = time.monotonic() + 10
    while raw.exists(b.keys.buffer("old199")):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    for i in range(200):
        b.buffer_append(f"new{i}", b"x")
    members = raw.smembers(b.keys.index())
    assert sum(m.startswith(b"t:new") for m in members) == 200  # live entries are never dropped
    assert sum(m.startswith(b"t:old") for m in members) < 100   # most dead ones are gone


def test_index_expires_with_the_last_thread(short_lived: RedisBackend, raw: redis.Redis) -> None:
    b = short_lived
    b.buffer_append("t", b"x")
    b.registry_set("r.t", "t")
    assert 0 < raw.ttl(b.keys.index()) <= 1
    deadline = time.monotonic() + 10
    while raw.exists(b.keys.index()):
        assert time.monotonic() < deadline, "the index outlived its threads"
        time.sleep(0.2)
    assert not list(raw.scan_iter(match=b.config.redis_prefix + "*"))


def test_reindex_recovers_threads_written_without_an_index(backend: RedisBackend, raw: redis.Redis) -> None:
    for t in ("p", "q"):
        backend.buffer_append(t, b"x")
    backend.registry_set("r.p", "p")
    raw.delete(backend.keys.index())  # data from before the index existed
    assert backend.buffer_list_threads() == []
    assert backend.reindex() == {"threads": 2, "chains": 1}
    assert backend.buffer_list_threads() == ["p", "q"]
    assert backend.registry_list_all() == {"p": "r.p"}
    assert backend.reindex() == {"threads": 0, "chains": 0}  # idempotent


def test_forged_index_entries_are_skipped(backend: RedisBackend, raw: redis.Redis,
                                          caplog: pytest.LogCaptureFixture) -> None:
    """Entries (and keys) this library never writes — not UTF-8, braces in a thread id, a chain
    mapped to bytes that are not text — are skipped with a warning; listing still works."""
    p = backend.config.redis_prefix
    backend.buffer_append("good", b"x")
    backend.registry_set("r.good", "good")
    raw.rpush(f"{p}buffer:{{".encode() + b"\xff\xfe}", b"x")
    raw.rpush(f"{p}buffer:{{a{{b}}", b"x")
    raw.set(f"{p}chain:r.bad", b"\xff")
    raw.sadd(backend.keys.index(), b"t:\xff\xfe", "t:a{b", "c:r.bad", "x:junk")
    with caplog.at_level("WARNING"):
        assert backend.buffer_list_threads() == ["good"]
        assert backend.registry_list_all() == {"good": "r.good"}
    assert "never writes" in caplog.text
    assert backend.info()["buffer_threads"] == 1
    assert backend.buffer_clear() >= 1 and backend.buffer_list_threads() == []
