"""ContextBuffer and ThreadRegistry keep xml-pipeline's shape and semantics on every backend."""
from __future__ import annotations

import pickle

import dataclasses
from collections.abc import Iterator

import pytest

from xml_pipeline.errors import ThreadFullError
from xml_pipeline.memory import (
    BufferSlot,
    ContextBuffer,
    InMemoryBackend,
    SharedBackend,
    SlotMetadata,
    get_context_buffer,
)
from xml_pipeline.memory.context_buffer import reset_context_buffer
from xml_pipeline.memory.factory import reset_default_backend
from xml_pipeline.message_bus.thread_registry import ThreadRegistry, get_registry, reset_registry


@dataclasses.dataclass(frozen=True)
class Greeting:
    name: str


# -- ContextBuffer ----------------------------------------------------------------------------------


def test_append_returns_a_frozen_slot_with_its_index(any_backend: SharedBackend) -> None:
    buffer = ContextBuffer(any_backend)
    first = buffer.append("t", Greeting("Ada"), "console", "greeter", own_name="greeter",
                          usage_instructions="be nice")
    second = buffer.append("t", Greeting("Bob"), "greeter", "greeter", is_self_call=True)
    assert (first.index, second.index) == (0, 1)
    meta = first.metadata
    assert (meta.thread_id, meta.from_id, meta.to_id, meta.payload_type, meta.own_name,
            meta.usage_instructions, meta.is_self_call) == \
        ("t", "console", "greeter", "Greeting", "greeter", "be nice", False)
    assert second.metadata.is_self_call and first.thread_id == "t" and first.to_id == "greeter"
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.payload = "changed"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        meta.slot_index = 7  # type: ignore[misc]
    assert buffer.get_thread_slots("t") == [first, second]  # read back: same values, same indices


def test_get_thread_and_helpers(any_backend: SharedBackend) -> None:
    buffer = ContextBuffer(any_backend)
    buffer.append("t", Greeting("Ada"), "console", "greeter")
    buffer.append("t", "plain text", "greeter", "console")
    buffer.append("t", Greeting("Cy"), "console", "greeter")
    thread = buffer.get_thread("t")
    assert thread is not None and len(thread) == 3 and thread[2].payload == Greeting("Cy")
    assert [s.index for s in thread] == [0, 1, 2]
    assert [s.index for s in thread.get_by_type("Greeting")] == [0, 2]
    assert [s.index for s in thread.get_from("greeter")] == [1]
    assert [s.index for s in thread.get_slice(1)] == [1, 2]
    assert buffer.get_thread("unknown") is None and buffer.get_thread_slots("unknown") == []
    assert buffer.get_slot("t", -1).index == 2  # type: ignore[union-attr]
    assert buffer.get_slot("t", 3) is None


def test_exists_delete_and_stats(any_backend: SharedBackend) -> None:
    buffer = ContextBuffer(any_backend, max_slots_per_thread=50)
    for t, n in (("a", 2), ("b", 3)):
        for i in range(n):
            buffer.append(t, i, "x", "y")
    stats = buffer.get_stats()
    assert (stats["thread_count"], stats["total_slots"], stats["threads"]) == (2, 5, ["a", "b"])
    assert stats["max_slots_per_thread"] == 50 and stats["backend"] == "shared"
    assert stats["backend_type"] == any_backend.config.backend_type
    assert buffer.thread_exists("a") and buffer.delete_thread("a") and not buffer.thread_exists("a")
    assert buffer.delete_thread("a") is False
    buffer.clear()
    assert buffer.get_stats()["thread_count"] == 0


def test_thread_limit_stores_nothing_past_it(any_backend: SharedBackend) -> None:
    buffer = ContextBuffer(any_backend, max_slots_per_thread=2)
    buffer.append("t", 1, "x", "y")
    buffer.append("t", 2, "x", "y")
    with pytest.raises(ThreadFullError, match="max_slots_per_thread"):
        buffer.append("t", 3, "x", "y")
    assert [s.payload for s in buffer.get_thread_slots("t")] == [1, 2]


def test_append_id_makes_a_retry_harmless(any_backend: SharedBackend) -> None:
    buffer = ContextBuffer(any_backend)
    first = buffer.append("t", "once", "x", "y", append_id="msg-1")
    again = buffer.append("t", "once", "x", "y", append_id="msg-1")
    assert first.index == again.index == 0 and buffer.thread_len("t") == 1


def test_slot_blob_carries_no_index_and_slots_read_back_get_their_position() -> None:
    backend = InMemoryBackend()
    buffer = ContextBuffer(backend)
    buffer.append("t", "a", "x", "y")
    _aid, body = backend.signer.place(backend.slot_namespace, "t").open(backend.buffer_get_slot("t", 0), 0)  # type: ignore[arg-type]
    stored = pickle.loads(body)
    assert stored.metadata.slot_index == -1  # assigned by the backend, not carried in the blob
    assert buffer.get_slot("t", 0).metadata.slot_index == 0  # type: ignore[union-attr]


def test_constructors_and_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ContextBuffer().is_shared is False  # a private in-memory buffer, like xml-pipeline's
    with pytest.raises(ValueError, match="max_slots_per_thread"):
        ContextBuffer(max_slots_per_thread=0)
    slot = BufferSlot("p", SlotMetadata("t", "a", "b", 3, "ts", "str"))
    assert slot.at_index(3) is slot and slot.at_index(4).index == 4


@pytest.fixture
def clean_defaults(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for var in ("XP_CONFIG", "XP_BACKEND_TYPE"):
        monkeypatch.delenv(var, raising=False)
    reset_context_buffer(), reset_registry(), reset_default_backend()
    yield
    reset_context_buffer(), reset_registry(), reset_default_backend()


def test_process_defaults_come_from_the_environment(clean_defaults: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XP_BACKEND_TYPE", "manager")
    buffer, registry = get_context_buffer(), get_registry()
    assert buffer.is_shared and registry.is_shared
    assert buffer.backend is registry.backend  # one default backend per process
    assert get_context_buffer() is buffer and get_registry() is registry
    other = InMemoryBackend()
    assert get_context_buffer(backend=other).backend is other  # an explicit backend is never ignored
    assert get_registry(backend=other).backend is other


# -- ThreadRegistry ---------------------------------------------------------------------------------


@pytest.fixture
def registry(any_backend: SharedBackend) -> ThreadRegistry:
    return ThreadRegistry(any_backend)


def test_chains_extend_with_calls_and_prune_with_responses(registry: ThreadRegistry) -> None:
    root = registry.initialize_root("hello-world")
    assert registry.lookup(root) == "system.hello-world" and registry.root_uuid == root
    assert registry.initialize_root("hello-world") == root
    t1 = registry.start_chain("console", "router")
    assert registry.lookup(t1) == "console.router"
    t2 = registry.extend_chain(t1, "greeter")
    assert registry.lookup(t2) == "console.router.greeter"
    assert registry.extend_chain(t1, "greeter") == t2  # one uuid per chain
    assert registry.get_or_create("console.router") == t1
    # greeter responds: back to router, on the router's thread
    assert registry.prune_for_response(t2) == ("router", t1)
    assert registry.prune_for_response(t1)[0] == "console"
    single = registry.get_or_create("console")
    assert registry.prune_for_response(single) == (None, None)  # nobody left to answer
    assert registry.lookup(single) is None
    assert registry.prune_for_response("unknown-thread") == (None, None)
    assert registry.extend_chain("unknown-thread", "solo") == registry.get_or_create("solo")


def test_register_thread_adopts_external_uuids_under_the_root(registry: ThreadRegistry) -> None:
    registry.initialize_root("org")
    assert registry.register_thread("ext-1", "console", "router") == "ext-1"
    assert registry.lookup("ext-1") == "system.org.console.router"
    assert registry.register_thread("ext-1", "console", "other") == "ext-1"  # already known
    assert registry.register_thread("ext-2", "console", "router") == "ext-1"  # chain already claimed
    assert registry.lookup("ext-2") is None
    registry.cleanup("ext-1")
    assert registry.lookup("ext-1") is None
    assert registry.debug_dump() == {registry.root_uuid: "system.org"}
    registry.clear()
    assert registry.debug_dump() == {} and registry.root_uuid is None


def test_names_with_dots_are_refused(registry: ThreadRegistry) -> None:
    for call in (lambda: registry.start_chain("a.b", "c"), lambda: registry.extend_chain("t", ""),
                 lambda: registry.get_or_create("a..b"), lambda: registry.initialize_root("my.org")):
        with pytest.raises(ValueError):
            call()


def test_registries_for_one_backend_share_the_root(any_backend: SharedBackend) -> None:
    root = get_registry(backend=any_backend).initialize_root("org")
    later = get_registry(backend=any_backend)
    assert later.root_uuid == root
    assert later.register_thread("ext", "console", "router") == "ext"
    assert later.lookup("ext") == "system.org.console.router"
    assert ThreadRegistry().is_shared is False
