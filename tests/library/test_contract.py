"""The SharedBackend contract (memory/protocol.py), one suite run on memory, manager and redis.

Whatever a test here asserts, every backend does: code written against the in-memory backend in a
unit test behaves the same on a manager server or on Redis in production.
"""
from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from xml_pipeline.errors import BackendUnavailable, ThreadFullError
from xml_pipeline.memory import ContextBuffer, SharedBackend
from xml_pipeline.memory.signing import Signer

MakeBackend = Callable[..., SharedBackend]

# -- Context Buffer operations -------------------------------------------------------------------


def test_satisfies_the_protocol(any_backend: SharedBackend) -> None:
    assert isinstance(any_backend, SharedBackend)
    assert isinstance(any_backend.signer, Signer)
    assert any_backend.is_shared is (type(any_backend).__name__ != "InMemoryBackend")


def test_append_returns_the_position_and_reads_back_in_order(any_backend: SharedBackend) -> None:
    b = any_backend
    assert [b.buffer_append("th", b"s%d" % i) for i in range(5)] == [0, 1, 2, 3, 4]
    assert b.buffer_get_thread("th") == [b"s0", b"s1", b"s2", b"s3", b"s4"]
    assert [b.buffer_get_slot("th", i) for i in range(5)] == b.buffer_get_thread("th")
    assert b.buffer_get_slot("th", -1) == b"s4"
    assert b.buffer_get_slot("th", 5) is None
    assert b.buffer_get_slot("nope", 0) is None
    assert b.buffer_get_thread("nope") == []
    assert b.buffer_thread_len("th") == 5 and b.buffer_thread_len("nope") == 0


def test_exists_delete_and_list_return_thread_ids(any_backend: SharedBackend) -> None:
    b = any_backend
    ids = ["b-thread", "a-thread", "c.thread:with:colons", "9f1c2d3e-uuid-like"]
    for t in ids:
        b.buffer_append(t, b"x")
    b.temp_put("not-a-thread", b"tmp")
    b.registry_set("x.y", "registry-only")
    assert b.buffer_list_threads() == sorted(ids)
    assert b.buffer_thread_exists("a-thread") and not b.buffer_thread_exists("registry-only")
    assert b.buffer_delete_thread("a-thread") is True
    assert b.buffer_delete_thread("a-thread") is False
    assert not b.buffer_thread_exists("a-thread")
    assert b.buffer_clear() == 3
    assert b.buffer_list_threads() == []
    # buffer_clear touches only buffers: the registry and temporary data stay
    assert b.registry_get_uuid("x.y") == "registry-only"
    assert b.temp_get("not-a-thread") == b"tmp"


def test_a_retried_append_with_the_same_id_is_stored_once(any_backend: SharedBackend) -> None:
    b = any_backend
    assert b.buffer_append("th", b"a", append_id="op-1") == 0
    assert b.buffer_append("th", b"b", append_id="op-2") == 1
    assert b.buffer_append("th", b"a", append_id="op-1") == 0  # the retry: first index, nothing stored
    assert b.buffer_append("other", b"a", append_id="op-1") == 0  # ids are per thread
    assert b.buffer_get_thread("th") == [b"a", b"b"]


def test_max_slots_is_part_of_the_append(any_backend: SharedBackend) -> None:
    b = any_backend
    for i in range(3):
        assert b.buffer_append("full", b"x%d" % i, max_slots=3, append_id=f"id{i}") == i
    with pytest.raises(ThreadFullError) as info:
        b.buffer_append("full", b"over", max_slots=3, append_id="id-over")
    assert (info.value.thread_id, info.value.limit) == ("full", 3)
    assert b.buffer_get_thread("full") == [b"x0", b"x1", b"x2"]
    # a retry of an append that did fit still gets its index, though the thread is full now
    assert b.buffer_append("full", b"x2", max_slots=3, append_id="id2") == 2
    assert b.buffer_append("full", b"no limit") == 3  # the limit belongs to the call, not the thread


@pytest.mark.parametrize("call, error", [
    (lambda b: b.buffer_append("", b"x"), ValueError),
    (lambda b: b.buffer_append("a{b}", b"x"), ValueError),  # braces would move the Redis hash tag
    (lambda b: b.buffer_append("t", "text, not bytes"), TypeError),
    (lambda b: b.buffer_append("t", b"x", max_slots=0), ValueError),
    (lambda b: b.buffer_get_slot("t", "0"), TypeError),
    (lambda b: b.registry_set("", "u"), ValueError),
    (lambda b: b.registry_set("a.b", "u{1}"), ValueError),
    (lambda b: b.temp_put("k", b"x", ttl=0), ValueError),
])
def test_bad_arguments_are_refused_the_same_way(any_backend: SharedBackend, call: object,
                                                error: type[Exception]) -> None:
    with pytest.raises(error):
        call(any_backend)  # type: ignore[operator]
    assert any_backend.buffer_list_threads() == []


# -- Thread Registry operations ------------------------------------------------------------------


def test_registry_maps_both_directions(any_backend: SharedBackend) -> None:
    b = any_backend
    b.registry_set("console.greeter", "u1")
    b.registry_set("console.router", "u2")
    assert b.registry_get_uuid("console.greeter") == "u1"
    assert b.registry_get_chain("u1") == "console.greeter"
    assert b.registry_get_uuid("nope") is None and b.registry_get_chain("nope") is None
    assert b.registry_list_all() == {"u1": "console.greeter", "u2": "console.router"}
    assert b.registry_delete("u1") is True
    assert b.registry_delete("u1") is False
    assert b.registry_get_uuid("console.greeter") is None
    assert b.registry_clear() == 1
    assert b.registry_list_all() == {}


def test_registry_set_removes_stale_mappings(any_backend: SharedBackend) -> None:
    b = any_backend
    b.registry_set("console.greeter", "u1")
    b.registry_set("console.greeter", "u2")  # the chain moves to a new uuid
    assert b.registry_get_chain("u1") is None  # stale reverse entry gone
    assert b.registry_get_chain("u2") == "console.greeter"
    b.registry_set("console.other", "u2")  # the uuid moves to a new chain
    assert b.registry_get_uuid("console.greeter") is None
    assert b.registry_list_all() == {"u2": "console.other"}


def test_registry_get_or_create_keeps_the_first_uuid(any_backend: SharedBackend) -> None:
    b = any_backend
    assert b.registry_get_or_create("a.b", "first") == "first"
    assert b.registry_get_or_create("a.b", "second") == "first"
    assert b.registry_get_chain("second") is None
    assert b.registry_list_all() == {"first": "a.b"}


# -- temporary data, lifecycle -------------------------------------------------------------------


def test_temp_data_is_its_own_key_space(any_backend: SharedBackend) -> None:
    b = any_backend
    b.temp_put("payload-1", b"p1")
    b.temp_put("payload-2", b"p2", ttl=30)
    assert b.temp_get("payload-1") == b"p1" and b.temp_get("missing") is None
    assert b.buffer_list_threads() == [] and b.registry_list_all() == {}
    assert b.temp_delete("payload-1", "payload-2", "missing") == 2
    assert b.temp_get("payload-2") is None


def test_info_ping_and_context_manager(any_backend: SharedBackend) -> None:
    b = any_backend
    b.buffer_append("t1", b"x")
    b.buffer_append("t2", b"x")
    b.registry_set("c.1", "t1")
    info = b.info()
    assert info["backend"] in ("memory", "manager", "redis")
    assert (info["buffer_threads"], info["registry_entries"]) == (2, 1)
    assert b.ping() is True
    with b as entered:
        assert entered is b
    assert b.ping() is False  # closed: ping says so instead of raising
    with pytest.raises(BackendUnavailable):
        b.buffer_get_thread("t1")


def test_slots_signed_by_one_client_verify_on_another(any_backend: SharedBackend) -> None:
    buffer = ContextBuffer(any_backend)
    slot = buffer.append("th", {"n": 1}, "a", "b")
    assert buffer.get_thread_slots("th") == [slot]
    assert any_backend.signer.verify(any_backend.buffer_get_slot("th", 0) or b"")


# -- TTL: sliding expiry, emulated identically -----------------------------------------------------


@pytest.mark.parametrize("kind", ["memory", "manager", "redis"])
def test_ttl_slides_with_writes_and_takes_registry_entries_along(make_backend: MakeBackend,
                                                                kind: str) -> None:
    b = make_backend(kind, redis_ttl=1)
    for t in ("active", "idle", "mapped", "read-only"):
        b.buffer_append(t, b"x")
        b.registry_set(f"c.{t}", t)
    # For 1.6 s (longer than the TTL): write to "active", re-map "mapped", only read "read-only".
    end = time.monotonic() + 1.6
    while time.monotonic() < end:
        b.buffer_append("active", b"y")
        b.registry_set("c.mapped", "mapped")
        b.buffer_get_thread("read-only")
        b.registry_get_chain("read-only")
        time.sleep(0.2)
    assert b.buffer_list_threads() == ["active", "mapped"]
    # Appends kept the thread's registry entries alive; re-mapping kept the thread's buffer alive.
    assert b.registry_list_all() == {"active": "c.active", "mapped": "c.mapped"}
    assert b.registry_get_chain("idle") is None and b.registry_get_uuid("c.idle") is None
    assert b.buffer_get_thread("read-only") == []  # reads never extend a TTL
    assert b.buffer_thread_len("active") > 2
    b.buffer_append("sleeper", b"x")  # written once, then left alone
    time.sleep(1.3)
    # What expired stays expired: a later write to the thread does not bring it back.
    b.registry_set("c.sleeper", "sleeper")  # (would refresh the sleeper's buffer, if it still existed)
    assert b.buffer_get_thread("sleeper") == []
    assert b.buffer_append("active", b"new") == 0  # a new log, and the expired registry entries stay gone
    assert b.registry_get_chain("active") is None and b.registry_get_uuid("c.active") is None
    assert b.buffer_list_threads() == ["active"]
    assert b.registry_list_all() == {"sleeper": "c.sleeper"}
    assert (b.info()["buffer_threads"], b.info()["registry_entries"]) == (1, 1)


@pytest.mark.parametrize("kind", ["memory", "manager"])
def test_no_ttl_means_no_expiry(make_backend: MakeBackend, kind: str) -> None:
    b = make_backend(kind, redis_ttl=0)
    b.buffer_append("t", b"x")
    b.registry_set("c.t", "t")
    b.temp_put("tmp", b"x", ttl=1)  # temporary data always expires
    time.sleep(1.2)
    assert b.buffer_get_thread("t") == [b"x"] and b.registry_get_chain("t") == "c.t"
    assert b.temp_get("tmp") is None


def test_memory_expiry_is_exact_between_sweeps(monkeypatch: pytest.MonkeyPatch) -> None:
    """The in-memory emulation purges lazily plus a periodic sweep; between sweeps an expired key
    must behave as gone (a fake clock puts us in that window deterministically)."""
    from xml_pipeline.memory import inmemory

    now = [1000.0]
    monkeypatch.setattr(inmemory.time, "monotonic", lambda: now[0])
    b = inmemory.InMemoryBackend(inmemory.BackendConfig(redis_ttl=86400))
    b.buffer_append("t", b"x")
    b.registry_set("c.t", "t")
    now[0] += 86390
    b.buffer_thread_len("other")  # runs a sweep: nothing has expired yet
    now[0] += 11  # now expired, and the next sweep is a minute away
    b.registry_set("c.new", "t")  # a write to thread t must not revive its expired buffer
    assert b.buffer_get_thread("t") == [] and b.registry_get_uuid("c.t") is None
    assert b.registry_list_all() == {"t": "c.new"}
