"""RedisBackend on a real redis-server: key layout, atomic scripts, prefixes, SCAN-only listing,
temporary data, info(), client hygiene and the no-signing-key warning."""
from __future__ import annotations

import hashlib
import logging
import secrets
import warnings
from collections.abc import Iterator

import pytest
import redis
from redis.crc import key_slot
from redis_server import RedisServer

from xml_pipeline.errors import BackendUnavailable, ConfigError, ThreadFullError
from xml_pipeline.memory.config import BackendConfig
from xml_pipeline.memory.context_buffer import ContextBuffer
from xml_pipeline.memory.keys import RedisKeys, glob_escape, validate_prefix
from xml_pipeline.memory.redis_backend import RedisBackend, UnsignedBackendWarning
from xml_pipeline.memory.signing import Signer

KEY = "test-signing-key-0123456789abcdef"


def unique_prefix(tag: str = "t") -> str:
    return f"{tag}{secrets.token_hex(4)}:"


def make(server: RedisServer, prefix: str, **kw: object) -> RedisBackend:
    kw.setdefault("signing_key", KEY)
    return RedisBackend(BackendConfig(backend_type="redis", redis_url=server.url, redis_prefix=prefix, **kw))


@pytest.fixture
def backend(redis_server: RedisServer) -> Iterator[RedisBackend]:
    b = make(redis_server, unique_prefix(), redis_ttl=600)
    yield b
    b.buffer_clear()
    b.registry_clear()
    b.close()


def our_keys(raw: redis.Redis, prefix: str) -> list[bytes]:
    return sorted(raw.scan_iter(match=glob_escape(prefix) + "*", count=1000))


# -- key layout -------------------------------------------------------------------------------------

def test_keys_of_a_thread_share_its_hash_tag(backend: RedisBackend, raw: redis.Redis) -> None:
    p = backend.config.redis_prefix
    backend.buffer_append("T1", b"slot")
    backend.registry_set("console.greeter", "T1")
    keys = [k.decode() for k in our_keys(raw, p)]
    assert sorted(keys) == sorted([f"{p}buffer:{{T1}}", f"{p}op:{{T1}}", f"{p}uuid:{{T1}}",
                                   f"{p}chain:console.greeter", f"{p}meta:index"])
    assert raw.smembers(f"{p}meta:index") == {b"t:T1", b"c:console.greeter"}
    # Every key of the thread hashes to the Cluster slot of its tag; the chain key (looked up by
    # chain) and the prefix's index cannot, and are the documented exceptions.
    tagged = [k for k in keys if "chain:" not in k and "meta:" not in k]
    assert {key_slot(k.encode()) for k in tagged} == {key_slot(b"T1")}


def test_thread_ids_with_braces_are_rejected(backend: RedisBackend) -> None:
    for bad in ("", "a{b", "a}b", "{x}"):
        with pytest.raises(ValueError, match="thread_id"):
            backend.buffer_append(bad, b"x")


def test_key_builder_and_patterns() -> None:
    k = RedisKeys("xp:team-a.orders:")
    assert k.buffer("t") == "xp:team-a.orders:buffer:{t}"
    assert k.key("tasks") == "xp:team-a.orders:tasks"
    assert k.key("results", "worker-1") == "xp:team-a.orders:results:worker-1"
    assert k.pattern("chain") == "xp:team-a.orders:chain:*"
    assert k.thread_of(k.buffer("abc")) == "abc"
    assert glob_escape("a*b?c[d]e\\") == "a\\*b\\?c\\[d\\]e\\\\"
    with pytest.raises(ValueError, match="key space"):
        k.key("nope")


# -- buffer -----------------------------------------------------------------------------------------

def test_append_returns_positions_and_reads_back(backend: RedisBackend) -> None:
    assert [backend.buffer_append("th", b"s%d" % i) for i in range(5)] == [0, 1, 2, 3, 4]
    assert backend.buffer_get_thread("th") == [b"s0", b"s1", b"s2", b"s3", b"s4"]
    assert backend.buffer_get_slot("th", 3) == b"s3"
    assert backend.buffer_get_slot("th", -1) == b"s4"
    assert backend.buffer_get_slot("th", 99) is None
    assert backend.buffer_thread_len("th") == 5
    assert backend.buffer_thread_exists("th")
    assert not backend.buffer_thread_exists("other")
    assert backend.buffer_get_thread("other") == []
    assert backend.buffer_delete_thread("th") is True
    assert backend.buffer_delete_thread("th") is False
    assert not backend.buffer_thread_exists("th")


def test_same_append_id_is_stored_once(backend: RedisBackend) -> None:
    assert backend.buffer_append("th", b"a", append_id="op-1") == 0
    assert backend.buffer_append("th", b"b") == 1
    # A retry of op-1 (same id) answers the first index and stores nothing.
    assert backend.buffer_append("th", b"a", append_id="op-1") == 0
    assert backend.buffer_get_thread("th") == [b"a", b"b"]


def test_max_slots_is_checked_in_the_append(backend: RedisBackend, raw: redis.Redis) -> None:
    for i in range(3):
        backend.buffer_append("full", b"x", max_slots=3, append_id=f"id{i}")
    with pytest.raises(ThreadFullError) as info:
        backend.buffer_append("full", b"y", max_slots=3, append_id="id-over")
    assert info.value.limit == 3
    assert backend.buffer_thread_len("full") == 3
    # The refused append left no trace: its id is not recorded, so it can succeed later.
    assert raw.hget(backend.keys.op("full"), "id-over") is None
    # A retry of an append that did fit still gets its index, even though the thread is full now.
    assert backend.buffer_append("full", b"x", max_slots=3, append_id="id2") == 2


def test_list_threads_returns_ids_not_keys(backend: RedisBackend) -> None:
    for t in ("b-thread", "a-thread", "c.thread:with:colons"):
        backend.buffer_append(t, b"x")
    backend.temp_put("payload-1", b"tmp")  # tmp keys are never threads
    backend.registry_set("x.y", "a-thread")
    assert backend.buffer_list_threads() == ["a-thread", "b-thread", "c.thread:with:colons"]
    assert backend.buffer_clear() == 3
    assert backend.buffer_list_threads() == []
    assert backend.temp_get("payload-1") == b"tmp"  # buffer_clear leaves other key spaces alone
    assert backend.registry_get_uuid("x.y") == "a-thread"


# -- registry ---------------------------------------------------------------------------------------

def test_registry_set_removes_the_stale_reverse_mapping(backend: RedisBackend) -> None:
    backend.registry_set("console.greeter", "u1")
    backend.registry_set("console.greeter", "u2")
    assert backend.registry_get_uuid("console.greeter") == "u2"
    assert backend.registry_get_chain("u2") == "console.greeter"
    assert backend.registry_get_chain("u1") is None  # stale reverse entry removed
    # Moving a uuid to another chain drops its old forward entry as well (a bijection).
    backend.registry_set("console.other", "u2")
    assert backend.registry_list_all() == {"u2": "console.other"}
    assert backend.registry_get_uuid("console.greeter") is None


def test_get_or_create_and_delete(backend: RedisBackend) -> None:
    assert backend.registry_get_or_create("a.b", "u1") == "u1"
    assert backend.registry_get_or_create("a.b", "u2") == "u1"
    assert backend.registry_get_chain("u2") is None
    assert backend.registry_delete("u1") is True
    assert backend.registry_delete("u1") is False
    assert backend.registry_get_uuid("a.b") is None
    backend.registry_set("c.d", "u3")
    backend.registry_set("e.f", "u4")
    assert backend.registry_list_all() == {"u3": "c.d", "u4": "e.f"}
    assert backend.registry_clear() == 2
    assert backend.registry_list_all() == {}
    assert backend.registry_get_chain("u3") is None


# -- temporary data ---------------------------------------------------------------------------------

def test_temp_space_is_separate_and_always_expires(redis_server: RedisServer, raw: redis.Redis) -> None:
    b = make(redis_server, unique_prefix(), redis_ttl=0)  # no TTL configured: tmp keys still expire
    try:
        b.temp_put("p1", b"payload")
        b.temp_put("p2", b"short", ttl=5)
        assert b.temp_get("p1") == b"payload"
        assert 0 < raw.ttl(b.keys.tmp("p1")) <= 86400
        assert 0 < raw.ttl(b.keys.tmp("p2")) <= 5
        assert b.buffer_list_threads() == []
        info = b.info()
        assert info["buffer_threads"] == 0 and info["registry_entries"] == 0
        assert b.temp_delete("p1", "p2", "missing") == 2
        assert b.temp_get("p1") is None
        with pytest.raises(ValueError):
            b.temp_put("p3", b"x", ttl=0)
    finally:
        b.close()


# -- prefixes ---------------------------------------------------------------------------------------

def test_prefix_isolation_between_nested_tenants(redis_server: RedisServer, raw: redis.Redis) -> None:
    tag = secrets.token_hex(3)
    a = make(redis_server, f"a{tag}:")
    ab = make(redis_server, f"a{tag}:b:")
    other = make(redis_server, f"c{tag}:")
    try:
        for b in (a, ab, other):
            b.buffer_append("shared-id", b"x")
            b.buffer_append(f"own-{b.config.redis_prefix}".replace(":", "."), b"y")
            b.registry_set("console.greeter", "shared-id")
            b.temp_put("tmp-1", b"z")
        raw.set(f"a{tag}:notours", "keep")  # a key of the same prefix outside our key spaces
        assert a.buffer_list_threads() == sorted(["shared-id", f"own-a{tag}.".replace(":", ".")])
        assert a.buffer_clear() == 2
        assert a.registry_clear() == 1
        # Tenant a: is empty; a:b: and c: are untouched.
        assert a.buffer_list_threads() == [] and a.registry_list_all() == {}
        for b in (ab, other):
            assert len(b.buffer_list_threads()) == 2
            assert b.registry_list_all() == {"shared-id": "console.greeter"}
            assert b.buffer_get_thread("shared-id") == [b"x"]
            assert b.temp_get("tmp-1") == b"z"
        assert raw.get(f"a{tag}:notours") == b"keep"
    finally:
        for b in (a, ab, other):
            b.buffer_clear()
            b.registry_clear()
            b.temp_delete("tmp-1")
            b.close()
        raw.delete(f"a{tag}:notours")


@pytest.mark.parametrize("bad", ["a:buffer:x:", "a:chain:", "tmp:", "a*:", "a?:", "a[b]:", "a", "a::",
                                 "{a}:", "a b:"])
def test_prefixes_that_could_reach_other_tenants_are_rejected(bad: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate_prefix(bad)
    assert info.value.field == "redis_prefix"
    with pytest.raises(ConfigError, match="backend.redis_prefix"):
        BackendConfig(backend_type="redis", redis_prefix=bad)


def test_listing_and_clearing_use_neither_keys_nor_scan(backend: RedisBackend, raw: redis.Redis) -> None:
    backend.buffer_append("t1", b"x")
    backend.registry_set("c.1", "t1")
    raw.config_resetstat()
    backend.buffer_list_threads()
    backend.registry_list_all()
    backend.info()
    backend.buffer_clear()
    backend.registry_clear()
    stats = raw.info("commandstats")
    # Neither KEYS nor SCAN (which an organism's ACL user is not granted): the index, by SSCAN.
    assert "cmdstat_keys" not in stats and "cmdstat_scan" not in stats
    assert stats["cmdstat_sscan"]["calls"] >= 5


# -- info, signer, client hygiene --------------------------------------------------------------------

def test_info(backend: RedisBackend) -> None:
    backend.buffer_append("t1", b"x")
    backend.buffer_append("t2", b"x")
    backend.registry_set("c.1", "t1")
    backend.temp_put("tmp", b"x")
    info = backend.info()
    assert info["backend"] == "redis"
    assert info["buffer_threads"] == 2
    assert info["registry_entries"] == 1
    assert info["prefix"] == backend.config.redis_prefix
    assert info["ttl"] == 600
    from redis_server import server_binary
    binary = server_binary()  # what the fixture started: its own name and version, not a compatibility one
    assert info["server"] == binary.flavor and info["server_version"] == ".".join(map(str, binary.version))
    assert info["counts_capped"] is False
    assert info["signing"] == "configured"


def test_client_hygiene(redis_server: RedisServer) -> None:
    password = "pw-" + secrets.token_hex(8)
    b = make(redis_server, unique_prefix(), redis_password=password, socket_timeout=1.5,
             connect_timeout=0.5, health_check_interval=7, max_connections=5)
    try:
        kw = b.client.connection_pool.connection_kwargs
        assert kw["socket_timeout"] == 1.5
        assert kw["socket_connect_timeout"] == 0.5
        assert kw["health_check_interval"] == 7
        assert kw["retry"].get_retries() == 0  # the raw client never repeats a command by itself
        assert b.client.connection_pool.max_connections == 5
        assert kw["password"] == password  # from config, never from the URL
        for text in (repr(b), b.url, str(b.info())):
            assert password not in text
    finally:
        b.close()
    with pytest.raises(BackendUnavailable, match="closed"):
        b.buffer_get_thread("t")
    assert b.ping() is False


def test_password_in_url_is_used_but_redacted(redis_factory: type[RedisServer]) -> None:
    server = redis_factory(password="url-secret-123").start()
    b = RedisBackend(BackendConfig(backend_type="redis", redis_prefix=unique_prefix(), signing_key=KEY,
                                   redis_url=f"redis://:url-secret-123@127.0.0.1:{server.port}/0"))
    with b:
        assert b.ping()
        assert b.url == f"redis://:***@127.0.0.1:{server.port}/0"
        assert "url-secret-123" not in repr(b) and "url-secret-123" not in str(b.info())


def test_context_manager_closes(redis_server: RedisServer) -> None:
    with make(redis_server, unique_prefix()) as b:
        assert b.ping()
    assert b.ping() is False


def test_no_signing_key_warns_once_and_signs_with_a_process_local_key(
        redis_server: RedisServer, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XP_SIGNING_KEY", raising=False)
    prefix = unique_prefix("nokey")
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        first = make(redis_server, prefix, signing_key=None)
        second = make(redis_server, prefix, signing_key=None)  # another backend of the same process
    try:
        ours = [w for w in caught if issubclass(w.category, UnsignedBackendWarning)]
        assert len(ours) == 1
        assert "private to this process" in str(ours[0].message) and "XP_SIGNING_KEY" in str(ours[0].message)
        assert len([r for r in caplog.records if "no signing key" in r.getMessage()]) == 1
        assert first.signer.local and second.signer.keys == first.signer.keys
        ContextBuffer(first).append("t", "written by first", "a", "b")
        assert [s.payload for s in ContextBuffer(second).get_thread_slots("t")] == ["written by first"]
        assert first.info()["signing"] == "process-local (no key configured)"
        # Nothing is derived from the prefix: a key computed from it does not verify our slots.
        prefix_key = Signer((hashlib.sha256(prefix.encode()).digest(),))
        assert first.signer.keys != prefix_key.keys
    finally:
        first.buffer_clear()
        first.close()
        second.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a configured key gives no warning at all
        keyed = make(redis_server, unique_prefix())
        assert not keyed.signer.local
        keyed.close()
