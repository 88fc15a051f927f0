"""Code written for xml-pipeline's Shared Backend runs unchanged on this library.

Every backend here is built the way xml-pipeline's users build them (`InMemoryBackend()`,
`ManagerBackend()`, `RedisBackend(url=..., prefix=..., ttl=...)`), imported from xml-pipeline's
module paths, and used through xml-pipeline's documented API: module paths, constructors, the shape
and type of what each method returns, `registry_list_all` as {uuid: chain}, `is_shared` and
`get_stats`, ThreadContext, the reset helpers. Where this library is stricter (signed slots,
validated names), the tests show the stricter behaviour next to the compatible one.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import pickle
import secrets
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from redis_server import RedisServer

from xml_pipeline.errors import BackendError, ConfigError, SlotIntegrityError, ThreadFullError

SIGNING_KEY = "upstream-compat-signing-key-0123456789"
KINDS = ("memory", "manager", "redis")


@dataclasses.dataclass
class Note:
    message: str
    value: int = 0


@dataclasses.dataclass(frozen=True)
class Other:
    text: str


def _slot(thread_id: str, index: int = 0) -> Any:
    from xml_pipeline.memory.context_buffer import BufferSlot, SlotMetadata
    return BufferSlot(payload=Note("hello", 42), metadata=SlotMetadata(
        thread_id=thread_id, from_id="sender", to_id="receiver", slot_index=index,
        timestamp="2024-01-15T00:00:00Z", payload_type="Note"))


@pytest.fixture
def signing_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XP_SIGNING_KEY", SIGNING_KEY)


@pytest.fixture(params=KINDS)
def upstream_backend(request: pytest.FixtureRequest, signing_env: None) -> Iterator[Any]:
    """A backend built with xml-pipeline's constructor of its kind (XP_SIGNING_KEY set)."""
    backend: Any
    if request.param == "memory":
        from xml_pipeline.memory.memory_backend import InMemoryBackend
        backend = InMemoryBackend()
    elif request.param == "manager":
        from xml_pipeline.memory.manager_backend import ManagerBackend
        backend = ManagerBackend()
    else:
        from xml_pipeline.memory.redis_backend import RedisBackend
        server: RedisServer = request.getfixturevalue("redis_server")
        backend = RedisBackend(url=server.url, prefix=f"up{secrets.token_hex(4)}:", ttl=300)
        backend.buffer_clear()
        backend.registry_clear()
    yield backend
    if backend.ping():
        backend.buffer_clear()
        backend.registry_clear()
    backend.close()


# -- module paths -----------------------------------------------------------------------------------

UPSTREAM_NAMES = {
    "xml_pipeline.memory": [
        "ContextBuffer", "ThreadContext", "BufferSlot", "SlotMetadata", "get_context_buffer",
        "reset_context_buffer", "slot_to_handler_metadata", "SharedBackend", "BackendConfig",
        "get_shared_backend", "reset_shared_backend", "serialize_slot", "deserialize_slot", "InMemoryBackend",
    ],
    "xml_pipeline.memory.shared_backend": [
        "SharedBackend", "BackendConfig", "get_shared_backend", "reset_shared_backend", "serialize_slot",
        "deserialize_slot",
    ],
    "xml_pipeline.memory.memory_backend": ["InMemoryBackend"],
    "xml_pipeline.memory.manager_backend": ["ManagerBackend"],
    "xml_pipeline.memory.redis_backend": ["RedisBackend"],
    "xml_pipeline.memory.context_buffer": [
        "ContextBuffer", "ThreadContext", "BufferSlot", "SlotMetadata", "get_context_buffer",
        "reset_context_buffer", "slot_to_handler_metadata",
    ],
    "xml_pipeline.message_bus.thread_registry": ["ThreadRegistry", "get_registry", "reset_registry"],
}


@pytest.mark.parametrize("module", sorted(UPSTREAM_NAMES))
def test_upstream_module_paths_import_the_same_objects(module: str) -> None:
    mod = importlib.import_module(module)
    import xml_pipeline.memory as memory
    for name in UPSTREAM_NAMES[module]:
        obj = getattr(mod, name)
        if hasattr(memory, name):
            assert obj is getattr(memory, name), f"{module}.{name} is a different object"
    exported = getattr(mod, "__all__", None)
    if exported is not None:  # `from module import *` brings them too
        assert set(exported) >= set(UPSTREAM_NAMES[module])


# -- constructors -----------------------------------------------------------------------------------


def test_redis_backend_takes_upstream_arguments(redis_server: RedisServer, signing_env: None) -> None:
    from xml_pipeline.memory import BackendConfig
    from xml_pipeline.memory.redis_backend import RedisBackend
    prefix = f"up{secrets.token_hex(4)}:"
    with RedisBackend(url=redis_server.url, prefix=prefix, ttl=120) as b:
        assert (b.url, b.prefix, b.ttl) == (redis_server.url, prefix, 120)
        assert b.config.redis_url == redis_server.url and b.config.redis_ttl == 120
        assert b.ping() is True
    with RedisBackend(redis_server.url, prefix=prefix) as b:  # url by position
        assert (b.url, b.prefix, b.ttl) == (redis_server.url, prefix, 86400)
    config = BackendConfig(backend_type="redis", redis_url=redis_server.url, redis_prefix=prefix, redis_ttl=60,
                           signing_key=SIGNING_KEY)
    with RedisBackend(config) as b:  # our form
        assert b.config is config and b.ttl == 60
    with RedisBackend(config, ttl=5) as b:  # keyword arguments override the config's fields
        assert b.ttl == 5 and b.prefix == prefix
    with pytest.raises(TypeError, match="redis_url given twice"):
        RedisBackend(redis_server.url, url=redis_server.url)
    with pytest.raises(ConfigError, match="backend.redis_url"):
        RedisBackend(url="http://localhost:6379")
    with pytest.raises(ConfigError, match="backend.redis_prefix"):
        RedisBackend(url=redis_server.url, prefix="*")


def test_redis_ttl_zero_keeps_keys_forever(redis_server: RedisServer, signing_env: None) -> None:
    from xml_pipeline.memory.redis_backend import RedisBackend
    prefix = f"up{secrets.token_hex(4)}:"
    client = redis_server.client()
    with RedisBackend(url=redis_server.url, prefix=prefix, ttl=0) as b:
        b.buffer_append("t", b"x")
        b.registry_set("a.b", "t")
        assert b.ttl == 0 and b.info()["ttl_seconds"] == 0
        keys = list(client.scan_iter(match=f"{prefix}*"))
        assert keys and all(client.ttl(k) == -1 for k in keys)
        b.buffer_clear(), b.registry_clear()
    with RedisBackend(url=redis_server.url, prefix=prefix, ttl=30) as b:
        b.buffer_append("t", b"x")
        assert 0 < client.ttl(b.keys.buffer("t")) <= 30 and b.info()["ttl_seconds"] == 30
        b.buffer_clear()
    client.close()


def test_manager_backend_takes_upstream_arguments(signing_env: None) -> None:
    from xml_pipeline.memory.manager_backend import ManagerBackend
    authkey = secrets.token_bytes(24)
    with ManagerBackend() as private:  # upstream's no-argument form: a private server
        assert private.owns_server and private.ping()
    owner = ManagerBackend(address="127.0.0.1:0", authkey=authkey, start_server=True)
    try:
        host, port = owner.address.rsplit(":", 1)
        address = (host, int(port))  # upstream's (host, port) tuple
        owner.registry_set("a.b", "u1")
        with ManagerBackend(address=address, authkey=authkey) as by_keyword:
            assert by_keyword.registry_get_chain("u1") == "a.b" and not by_keyword.owns_server
        with ManagerBackend(address, authkey) as by_position:
            assert by_position.registry_get_uuid("a.b") == "u1"
        with pytest.raises(ConfigError, match="backend.manager_authkey"):
            ManagerBackend(address=address)  # connecting needs the server's authkey
    finally:
        owner.close()


def test_backend_config_takes_upstream_forms() -> None:
    from xml_pipeline.memory.shared_backend import BackendConfig
    config = BackendConfig("redis", "redis://localhost:6380", "app:", 3600)  # upstream's field order
    assert (config.backend_type, config.redis_url, config.redis_prefix, config.redis_ttl) == \
        ("redis", "redis://localhost:6380", "app:", 3600)
    limits = BackendConfig(max_slots_per_thread=50, max_threads=7)
    assert (limits.max_slots_per_thread, limits.max_threads) == (50, 7)
    assert BackendConfig().max_slots_per_thread == 10_000 and BackendConfig().max_threads == 1_000
    manager = BackendConfig(backend_type="manager", manager_address=("127.0.0.1", 50000),
                            manager_authkey=b"k" * 16)
    assert manager.manager_address == "127.0.0.1:50000"
    with pytest.raises(ConfigError, match="backend.max_threads"):
        BackendConfig(max_threads=0)
    with pytest.raises(TypeError):
        BackendConfig("redis", "redis://localhost:6379", "xp:", 60, None)  # the rest by keyword only


# -- every backend method: shape and type of what it returns -----------------------------------------


def test_buffer_operations_shapes(upstream_backend: Any) -> None:
    from xml_pipeline.memory.shared_backend import SharedBackend, serialize_slot
    b = upstream_backend
    assert isinstance(b, SharedBackend)  # the protocol is runtime-checkable, as xml-pipeline's
    data = serialize_slot(_slot("thread-1"))
    assert b.buffer_append("thread-1", data) == 0
    assert b.buffer_append("thread-1", data) == 1
    assert b.buffer_append("thread-2", data) == 0
    slots = b.buffer_get_thread("thread-1")
    assert isinstance(slots, list) and slots == [data, data] and all(type(s) is bytes for s in slots)
    assert b.buffer_get_thread("unknown") == []
    assert b.buffer_get_slot("thread-1", 1) == data and b.buffer_get_slot("thread-1", 999) is None
    assert b.buffer_get_slot("unknown", 0) is None
    assert b.buffer_thread_len("thread-1") == 2 and b.buffer_thread_len("unknown") == 0
    assert b.buffer_thread_exists("thread-1") is True and b.buffer_thread_exists("unknown") is False
    threads = b.buffer_list_threads()
    assert isinstance(threads, list) and sorted(threads) == ["thread-1", "thread-2"]  # ids, not keys
    assert b.buffer_delete_thread("thread-2") is True and b.buffer_delete_thread("thread-2") is False
    b.buffer_clear()
    assert b.buffer_list_threads() == [] and b.buffer_thread_exists("thread-1") is False


def test_registry_operations_shapes(upstream_backend: Any) -> None:
    b = upstream_backend
    assert b.registry_set("console.router.greeter", "uuid-abc") is None
    b.registry_set("a.b", "uuid-1")
    assert b.registry_get_uuid("console.router.greeter") == "uuid-abc"
    assert b.registry_get_chain("uuid-abc") == "console.router.greeter"
    assert b.registry_get_uuid("no.such") is None and b.registry_get_chain("no-such") is None
    all_mappings = b.registry_list_all()
    assert all_mappings == {"uuid-abc": "console.router.greeter", "uuid-1": "a.b"}  # uuid -> chain
    assert b.registry_delete("uuid-1") is True and b.registry_delete("uuid-1") is False
    assert b.registry_get_uuid("a.b") is None and b.registry_list_all() == {"uuid-abc": "console.router.greeter"}
    b.registry_clear()
    assert b.registry_list_all() == {}


def test_monitoring_shapes(upstream_backend: Any) -> None:
    b = upstream_backend
    b.buffer_append("t", b"x")
    b.registry_set("a.b", "u")
    info = b.info()
    assert (info["buffer_threads"], info["registry_entries"]) == (1, 1)
    assert info["backend"] in KINDS
    if info["backend"] == "redis":
        assert info["ttl_seconds"] == b.ttl == 300
    assert b.ping() is True


def test_close_ends_the_backend(upstream_backend: Any) -> None:
    from xml_pipeline.errors import BackendUnavailable
    upstream_backend.close()
    assert upstream_backend.ping() is False
    with pytest.raises(BackendUnavailable):
        upstream_backend.buffer_append("t", b"x")


# -- serialize_slot / deserialize_slot --------------------------------------------------------------


def test_slots_round_trip_through_every_backend(upstream_backend: Any) -> None:
    from xml_pipeline.memory.shared_backend import deserialize_slot, serialize_slot
    upstream_backend.buffer_append("thread-1", serialize_slot(_slot("thread-1", 3)))
    back = deserialize_slot(upstream_backend.buffer_get_slot("thread-1", 0))
    assert back == _slot("thread-1", 3) and back.payload.message == "hello"


def test_tampered_slot_is_a_value_error_and_never_unpickled(tmp_path: Path) -> None:
    from xml_pipeline.memory.shared_backend import deserialize_slot, serialize_slot
    data = serialize_slot(_slot("t"))
    tampered = data[:-1] + bytes([data[-1] ^ 1])
    with pytest.raises(ValueError):  # what xml-pipeline raises for a failed HMAC
        deserialize_slot(tampered)
    with pytest.raises(SlotIntegrityError):
        deserialize_slot(b"short")
    # Bare pickle bytes (what xml-pipeline's first backends stored) run code when unpickled: they are
    # rejected before that happens.
    marker = tmp_path / "ran"
    evil = pickle.dumps(_Touch(str(marker)))
    with pytest.raises(SlotIntegrityError):
        deserialize_slot(evil)
    assert not marker.exists()


class _Touch:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (Path(self.path),))


def test_without_a_signing_key_slots_still_round_trip_in_one_process(monkeypatch: pytest.MonkeyPatch,
                                                                      redis_server: RedisServer) -> None:
    monkeypatch.delenv("XP_SIGNING_KEY", raising=False)
    from xml_pipeline.memory.redis_backend import RedisBackend, UnsignedBackendWarning
    from xml_pipeline.memory.shared_backend import deserialize_slot, serialize_slot
    prefix = f"up{secrets.token_hex(4)}:"
    with pytest.warns(UnsignedBackendWarning, match="no signing key"):
        backend = RedisBackend(url=redis_server.url, prefix=prefix, ttl=60)
    try:
        backend.buffer_append("t", serialize_slot(_slot("t")))
        assert deserialize_slot(backend.buffer_get_slot("t", 0)) == _slot("t")
        backend.buffer_clear()
    finally:
        backend.close()


# -- ContextBuffer ----------------------------------------------------------------------------------


def test_context_buffer_on_a_backend_is_shared(upstream_backend: Any) -> None:
    from xml_pipeline.memory.context_buffer import ContextBuffer, get_context_buffer
    buffer = ContextBuffer(backend=upstream_backend)
    assert buffer.is_shared is True and get_context_buffer(backend=upstream_backend).is_shared is True
    slot = buffer.append(thread_id="test-thread", payload=Note("hello", 42), from_id="sender", to_id="receiver")
    assert (slot.thread_id, slot.payload.message, slot.index) == ("test-thread", "hello", 0)
    thread = buffer.get_thread("test-thread")
    assert thread is not None and len(thread) == 1 and thread[0].payload == Note("hello", 42)
    assert buffer.get_thread("nope") is None and buffer.get_thread_slots("test-thread") == [slot]
    stats = buffer.get_stats()
    assert set(stats) >= {"thread_count", "total_slots", "max_threads", "max_slots_per_thread", "threads", "backend"}
    assert (stats["thread_count"], stats["total_slots"], stats["threads"], stats["backend"]) == \
        (1, 1, ["test-thread"], "shared")
    assert (stats["max_threads"], stats["max_slots_per_thread"]) == (1000, 10000)
    assert stats["backend_type"] == upstream_backend.info()["backend"]
    assert buffer.thread_exists("test-thread") and buffer.delete_thread("test-thread") is True
    assert buffer.delete_thread("test-thread") is False
    buffer.append("x", 1, "s", "r")
    buffer.clear()
    assert buffer.get_stats()["thread_count"] == 0


def test_context_buffer_without_a_backend_is_local() -> None:
    from xml_pipeline.memory.context_buffer import ContextBuffer
    buffer = ContextBuffer()
    buffer.append("t1", Note("a"), "s", "r")
    assert buffer.is_shared is False and buffer.get_stats()["backend"] == "local"
    assert buffer.get_stats()["backend_type"] == "memory"


def test_thread_full_raises_memory_error_and_stores_nothing(upstream_backend: Any) -> None:
    from xml_pipeline.memory.context_buffer import ContextBuffer
    buffer = ContextBuffer(backend=upstream_backend)
    buffer.max_slots_per_thread = 2  # upstream sets the attribute
    buffer.append("t1", Note("1"), "s", "r")
    buffer.append("t1", Note("2"), "s", "r")
    with pytest.raises(MemoryError, match="exceeded max slots") as info:
        buffer.append("t1", Note("3"), "s", "r")
    assert isinstance(info.value, ThreadFullError) and isinstance(info.value, BackendError)
    assert [s.payload.message for s in buffer.get_thread_slots("t1")] == ["1", "2"]


def test_max_threads_evicts_the_oldest_thread_of_a_local_buffer() -> None:
    from xml_pipeline.memory.context_buffer import ContextBuffer
    buffer = ContextBuffer()
    buffer.max_threads = 2
    buffer.append("t1", Note("first"), "s", "r")
    buffer.append("t2", Note("second"), "s", "r")
    buffer.append("t1", Note("again"), "s", "r")  # an existing thread: nothing evicted
    assert buffer.get_stats()["thread_count"] == 2
    buffer.append("t3", Note("third"), "s", "r")
    assert buffer.get_stats()["thread_count"] == 2
    assert not buffer.thread_exists("t1") and buffer.thread_exists("t2") and buffer.thread_exists("t3")
    with pytest.raises(ValueError, match="thread_id"):
        buffer.append("{bad}", Note("x"), "s", "r")  # refused before anything is evicted
    assert buffer.thread_exists("t2") and buffer.thread_exists("t3")
    buffer.delete_thread("t2")
    buffer.append("t4", Note("fourth"), "s", "r")  # room was made by the delete: t3 stays
    assert buffer.thread_exists("t3") and buffer.thread_exists("t4")


def test_max_threads_is_not_enforced_on_a_backend(upstream_backend: Any) -> None:
    from xml_pipeline.memory.context_buffer import ContextBuffer
    buffer = ContextBuffer(backend=upstream_backend)
    buffer.max_threads = 2  # threads on a backend end by TTL or delete_thread, as upstream's do
    for t in ("t1", "t2", "t3"):
        buffer.append(t, Note(t), "s", "r")
    assert buffer.get_stats()["thread_count"] == 3 and buffer.get_stats()["max_threads"] == 2


def test_constructor_limits_are_validated() -> None:
    from xml_pipeline.memory.context_buffer import ContextBuffer
    assert ContextBuffer(max_threads=5).max_threads == 5
    with pytest.raises(ValueError, match="max_threads"):
        ContextBuffer(max_threads=0)


# -- ThreadContext ----------------------------------------------------------------------------------


def test_standalone_thread_context_appends_in_order() -> None:
    from xml_pipeline.memory import BufferSlot, ThreadContext
    ctx = ThreadContext("thread-1")
    first = ctx.append(payload=Note("a"), from_id="alice", to_id="r")
    ctx.append(Other("b"), "bob", "r", own_name="r", is_self_call=False, usage_instructions="use it")
    ctx.append(Note("c"), "alice", "r")
    assert isinstance(first, BufferSlot) and [s.index for s in ctx] == [0, 1, 2] and len(ctx) == 3
    assert ctx[1].payload == Other("b") and ctx[1].metadata.usage_instructions == "use it"
    assert [s.index for s in ctx.get_by_type("Note")] == [0, 2]
    assert [s.index for s in ctx.get_from("bob")] == [1]
    assert [s.index for s in ctx.get_slice(1)] == [1, 2] and ctx.is_live is False
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.metadata.slot_index = 9  # type: ignore[misc]


def test_get_or_create_thread_is_a_live_view(upstream_backend: Any) -> None:
    from xml_pipeline.memory.context_buffer import ContextBuffer
    buffer = ContextBuffer(backend=upstream_backend)
    view = buffer.get_or_create_thread("thread-1")
    assert view is buffer.get_or_create_thread("thread-1") and view is not buffer.get_or_create_thread("thread-2")
    assert view.is_live and len(view) == 0 and not buffer.thread_exists("thread-1")
    slot = view.append(Note("via view"), "s", "r")
    assert slot.index == 0 and buffer.get_thread_slots("thread-1") == [slot]
    other = ContextBuffer(backend=upstream_backend)  # another writer on the same backend
    other.append("thread-1", Note("elsewhere"), "x", "y")
    assert len(view) == 2 and view[1].payload == Note("elsewhere") and view[-1].index == 1
    assert [s.payload.message for s in view] == ["via view", "elsewhere"]
    with pytest.raises(IndexError):
        view[5]
    snapshot = buffer.get_thread("thread-1")
    assert snapshot is not None and not snapshot.is_live
    other.append("thread-1", Note("later"), "x", "y")
    assert len(snapshot) == 2 and len(view) == 3  # a snapshot does not move, a view does


# -- handler metadata -------------------------------------------------------------------------------


def test_slot_to_handler_metadata() -> None:
    from xml_pipeline.memory import ContextBuffer, HandlerMetadata, slot_to_handler_metadata
    slot = ContextBuffer().append(thread_id="t1", payload=Note("x"), from_id="sender", to_id="receiver",
                                  own_name="agent", is_self_call=True, usage_instructions="peers: none")
    meta = slot_to_handler_metadata(slot)
    assert isinstance(meta, HandlerMetadata)
    assert (meta.thread_id, meta.from_id, meta.own_name, meta.is_self_call, meta.usage_instructions) == \
        ("t1", "sender", "agent", True, "peers: none")


# -- ThreadRegistry ---------------------------------------------------------------------------------


def test_thread_registry_on_a_backend(upstream_backend: Any) -> None:
    from xml_pipeline.message_bus.thread_registry import ThreadRegistry, get_registry
    registry = ThreadRegistry(backend=upstream_backend)
    assert registry.is_shared is True and get_registry(backend=upstream_backend).is_shared is True
    root = registry.initialize_root("test-organism")
    assert registry.root_uuid == root and registry.root_chain == "system.test-organism"
    assert registry.initialize_root("test-organism") == root
    uuid = registry.get_or_create("a.b.c")
    assert registry.get_or_create("a.b.c") == uuid and registry.lookup(uuid) == "a.b.c"
    deeper = registry.extend_chain(uuid, "d")
    assert registry.lookup(deeper) == "a.b.c.d"
    assert registry.prune_for_response(deeper) == ("c", uuid)
    assert registry.prune_for_response("unknown") == (None, None)
    started = registry.start_chain("console", "router")
    assert registry.lookup(started) == "console.router"
    assert registry.register_thread("ext-1", "console", "greeter") == "ext-1"
    assert registry.lookup("ext-1") == "system.test-organism.console.greeter"
    assert registry.debug_dump() == upstream_backend.registry_list_all()  # {uuid: chain}
    assert registry.debug_dump()[root] == "system.test-organism"
    registry.cleanup("ext-1")
    assert registry.lookup("ext-1") is None
    single = registry.get_or_create("lonely")
    assert registry.prune_for_response(single) == (None, None) and registry.lookup(single) is None
    registry.clear()
    assert registry.debug_dump() == {} and registry.root_uuid is None and registry.root_chain == "system"


def test_thread_registry_without_a_backend_is_local() -> None:
    from xml_pipeline.message_bus.thread_registry import ThreadRegistry
    registry = ThreadRegistry()
    uuid = registry.get_or_create("a.b")
    assert registry.is_shared is False and registry.debug_dump() == {uuid: "a.b"}


# -- process-wide helpers ---------------------------------------------------------------------------


@pytest.fixture
def clean_process(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    from xml_pipeline.memory.shared_backend import reset_shared_backend
    for var in ("XP_CONFIG", "XP_BACKEND_TYPE"):
        monkeypatch.delenv(var, raising=False)
    reset_shared_backend()
    yield
    reset_shared_backend()


def test_process_defaults_and_reset_helpers(clean_process: None) -> None:
    from xml_pipeline.memory import (
        BackendConfig,
        get_context_buffer,
        get_shared_backend,
        reset_context_buffer,
        reset_shared_backend,
    )
    from xml_pipeline.message_bus.thread_registry import get_registry, reset_registry
    buffer = get_context_buffer()
    assert buffer is get_context_buffer() and buffer.is_shared is False  # in-process default
    assert buffer.get_stats()["backend"] == "local"
    buffer.append("t", Note("x"), "s", "r")
    registry = get_registry()
    assert registry is get_registry() and registry.is_shared is False
    chain_uuid = registry.get_or_create("a.b")

    reset_context_buffer()  # clears, then forgets (upstream's test helper)
    fresh = get_context_buffer()
    assert fresh is not buffer and not fresh.thread_exists("t")
    reset_registry()
    assert get_registry() is not registry and get_registry().lookup(chain_uuid) is None

    made = get_shared_backend(BackendConfig(backend_type="memory"))
    default_backend = get_context_buffer().backend
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # closing is quiet
        reset_shared_backend()
    assert made.ping() is False and default_backend.ping() is False  # both closed
    after = get_context_buffer()
    assert after.backend is not default_backend and after.backend.ping()


def test_get_shared_backend_is_the_process_wide_backend(clean_process: None) -> None:
    """Two calls share one backend (so a buffer and a registry built from them see one state); a
    different config is not ignored; a closed shared backend is replaced; create_backend() is the
    caller's own."""
    from xml_pipeline.memory import BackendConfig, create_backend, get_shared_backend
    first = get_shared_backend()
    assert get_shared_backend() is first and first.config.backend_type == "memory"
    assert get_shared_backend(first.config) is first
    first.registry_set("a.b", "u1")
    assert get_shared_backend().registry_get_uuid("a.b") == "u1"
    other = get_shared_backend(BackendConfig(backend_type="memory", redis_ttl=60))
    assert other is not first and other.config.ttl == 60 and get_shared_backend() is other
    assert first.registry_get_uuid("a.b") == "u1"  # the previous one stays open for its holders
    other.close()
    replaced = get_shared_backend()
    assert replaced is not other and not replaced.closed
    own = create_backend(BackendConfig(backend_type="memory"))
    assert own is not get_shared_backend()
    own.close()
    assert not get_shared_backend().closed


def test_default_buffer_on_a_configured_shared_backend(clean_process: None,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from xml_pipeline.memory import get_context_buffer
    from xml_pipeline.message_bus.thread_registry import get_registry
    monkeypatch.setenv("XP_BACKEND_TYPE", "manager")
    assert get_context_buffer().is_shared is True and get_registry().is_shared is True
    assert get_context_buffer().get_stats()["backend_type"] == "manager"


def test_backends_built_from_upstream_arguments_sign_with_xp_signing_key(
        signing_env: None, redis_server: RedisServer) -> None:
    """The key serialize_slot() uses by default is the one such a backend signs with."""
    from xml_pipeline.memory import ContextBuffer
    from xml_pipeline.memory.redis_backend import RedisBackend
    from xml_pipeline.memory.serialization import default_signer
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "unsigned backend" warning: a key is configured
        backend = RedisBackend(url=redis_server.url, prefix=f"up{secrets.token_hex(4)}:", ttl=60)
    try:
        assert backend.signer.keys == default_signer().keys == (SIGNING_KEY.encode(),)
        ContextBuffer(backend).append("t", Note("signed"), "s", "r")
        reader = RedisBackend(url=redis_server.url, prefix=backend.prefix, ttl=60)  # another client
        assert ContextBuffer(reader).get_thread_slots("t")[0].payload == Note("signed")
        reader.close()
        backend.buffer_clear()
    finally:
        backend.close()
    assert os.environ["XP_SIGNING_KEY"] == SIGNING_KEY


def test_every_method_takes_upstream_keyword_names(upstream_backend: Any) -> None:
    """Callers that name their arguments (xml-pipeline's parameter names) are served too."""
    from xml_pipeline.memory.context_buffer import ContextBuffer
    from xml_pipeline.message_bus.thread_registry import ThreadRegistry
    b = upstream_backend
    assert b.buffer_append(thread_id="t", slot_data=b"x") == 0
    assert b.buffer_get_thread(thread_id="t") == [b"x"] and b.buffer_get_slot(thread_id="t", index=0) == b"x"
    assert b.buffer_thread_len(thread_id="t") == 1 and b.buffer_thread_exists(thread_id="t")
    assert b.buffer_delete_thread(thread_id="t")
    b.registry_set(chain="a.b", uuid="u")
    assert b.registry_get_uuid(chain="a.b") == "u" and b.registry_get_chain(uuid="u") == "a.b"
    assert b.registry_delete(uuid="u")

    buffer = ContextBuffer(backend=b)
    slot = buffer.append(thread_id="t", payload=Note("k"), from_id="f", to_id="r", own_name="r",
                         is_self_call=False, usage_instructions="")
    assert buffer.get_thread(thread_id="t") is not None and buffer.get_thread_slots(thread_id="t") == [slot]
    assert buffer.thread_exists(thread_id="t") and buffer.get_or_create_thread(thread_id="t")[0] == slot
    assert buffer.delete_thread(thread_id="t")

    registry = ThreadRegistry(backend=b)
    root = registry.initialize_root(organism_name="org")
    one = registry.get_or_create(chain="x.y")
    two = registry.extend_chain(current_uuid=one, next_hop="z")
    assert registry.lookup(thread_id=two) == "x.y.z" and registry.prune_for_response(thread_id=two) == ("y", one)
    assert registry.lookup(registry.start_chain(initiator="p", target="q")) == "p.q"
    assert registry.register_thread(thread_id="ext", initiator="p", target="s") == "ext"
    registry.cleanup(thread_id="ext")
    assert registry.lookup("ext") is None and registry.lookup(root) == "system.org"
