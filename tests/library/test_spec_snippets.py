"""Every ```python block of the upstream Shared Backend API document, copied verbatim and executed.

That document (called "the spec" below) is not shipped with the project, so the snippets are copied here character for character
(SNIPPETS, in the order they appear). They run in one namespace per backend, the way a reader walks
through the document: the backend-creating snippet first, then the API snippets on that backend.
Names a snippet uses without defining (thread_id, slot_bytes, chain, uuid, buffer_slot, ...) are
provided beforehand, as the prose around them implies.

One substitution, and only one: the Redis snippets say redis://localhost:6379. Port 6379 may be
taken on a test machine, so they run against the real redis-server of the `fresh_redis` fixture,
with that URL string replaced by the fixture's URL before execution. Nothing else is changed.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any

import pytest
from redis_server import RedisServer

from xml_pipeline.memory import BufferSlot, SlotMetadata

SNIPPETS: dict[str, str] = {}

# -- Backend Types ---------------------------------------------------------------------------------
SNIPPETS["memory"] = '''\
from xml_pipeline.memory import get_shared_backend, BackendConfig
config = BackendConfig(backend_type="memory")
backend = get_shared_backend(config)
'''
SNIPPETS["manager"] = '''\
config = BackendConfig(backend_type="manager")
backend = get_shared_backend(config)
'''
SNIPPETS["redis"] = '''\
config = BackendConfig(
    backend_type="redis",
    redis_url="redis://localhost:6379",
    redis_prefix="xp:",
    redis_ttl=86400,  # 24 hours
)
backend = get_shared_backend(config)
'''
# -- Configuration: Programmatic --------------------------------------------------------------------
SNIPPETS["programmatic"] = '''\
from xml_pipeline.memory import get_shared_backend, BackendConfig
config = BackendConfig(
    backend_type="redis",
    redis_url="redis://localhost:6379",
    redis_prefix="myapp:",
    redis_ttl=3600,
)
backend = get_shared_backend(config)
'''
# -- Storage Schema --------------------------------------------------------------------------------
SNIPPETS["schema_buffers"] = '''\
_buffers = {
    "thread-uuid-1": [slot_bytes_0, slot_bytes_1, ...],
    "thread-uuid-2": [...],
}
'''
SNIPPETS["schema_registry"] = '''\
_chain_to_uuid = {"console.greeter": "uuid-123"}
_uuid_to_chain = {"uuid-123": "console.greeter"}
'''
# -- API -------------------------------------------------------------------------------------------
SNIPPETS["buffer_operations"] = '''\
index = backend.buffer_append(thread_id, slot_bytes)   # Append a slot
slots = backend.buffer_get_thread(thread_id)           # Get all slots for thread
slot = backend.buffer_get_slot(thread_id, index)       # Get specific slot
exists = backend.buffer_thread_exists(thread_id)       # Check thread exists
deleted = backend.buffer_delete_thread(thread_id)      # Delete thread
threads = backend.buffer_list_threads()                # List all threads
backend.buffer_clear()                                 # Clear all (testing)
'''
SNIPPETS["registry_operations"] = '''\
backend.registry_set(chain, uuid)            # Set chain ↔ UUID mapping
uuid = backend.registry_get_uuid(chain)      # Get UUID from chain
chain = backend.registry_get_chain(uuid)     # Get chain from UUID
deleted = backend.registry_delete(uuid)      # Delete mapping
all_mappings = backend.registry_list_all()   # List all mappings
backend.registry_clear()                     # Clear all (testing)
'''
SNIPPETS["serialization"] = '''\
from xml_pipeline.memory import serialize_slot, deserialize_slot
slot_bytes = serialize_slot(buffer_slot)   # Serialize for storage
slot = deserialize_slot(slot_bytes)        # Deserialize after retrieval
'''
# -- Integration -----------------------------------------------------------------------------------
SNIPPETS["context_buffer"] = '''\
from xml_pipeline.memory import get_context_buffer
buffer = get_context_buffer(backend=backend)   # Uses shared backend automatically if configured
print(buffer.is_shared)                        # True
'''
SNIPPETS["thread_registry"] = '''\
from xml_pipeline.message_bus.thread_registry import get_registry
registry = get_registry(backend=backend)
print(registry.is_shared)   # True
'''
# -- TTL and Cleanup: Manual Cleanup ---------------------------------------------------------------
SNIPPETS["manual_cleanup"] = '''\
backend.buffer_delete_thread(thread_id)   # Delete specific thread
backend.registry_delete(uuid)
backend.buffer_clear()                    # Clear all (testing only)
backend.registry_clear()
'''
# -- Monitoring ------------------------------------------------------------------------------------
SNIPPETS["info"] = '''\
info = backend.info()   # {'buffer_threads': 5, 'registry_entries': 12}
'''
SNIPPETS["ping"] = '''\
is_healthy = backend.ping()   # True if connected
'''
# -- Testing ---------------------------------------------------------------------------------------
SNIPPETS["testing"] = '''\
import pytest
from xml_pipeline.memory import InMemoryBackend

@pytest.fixture
def backend():
    backend = InMemoryBackend()
    yield backend
    backend.close()

def test_buffer_operations(backend):
    backend.buffer_append("thread-1", b"data")
    assert backend.buffer_thread_exists("thread-1")
'''

SPEC_URL = "redis://localhost:6379"


def run(name: str, namespace: dict[str, Any], redis_url: str | None = None) -> dict[str, Any]:
    source = SNIPPETS[name]
    if redis_url is not None:
        assert SPEC_URL in source
        source = source.replace(SPEC_URL, redis_url)  # the one documented substitution
    with warnings.catch_warnings():
        # the spec's Redis config has no signing key: the backend warns (tested elsewhere)
        warnings.filterwarnings("ignore", message=".*no signing key")
        exec(compile(source, f"<spec snippet {name}>", "exec"), namespace)
    return namespace


def test_every_python_block_of_the_spec_is_here() -> None:
    # 15 ```python blocks in shared-backend.md, in document order
    assert len(SNIPPETS) == 15


@pytest.mark.parametrize("kind", ["memory", "manager", "redis"])
def test_walk_through_the_spec(kind: str, fresh_redis: RedisServer, capsys: pytest.CaptureFixture[str]) -> None:
    ns: dict[str, Any] = {}
    run("memory", ns)  # every walk starts where the document does (it imports the names)
    if kind != "memory":
        ns["backend"].close()
        run(kind, ns, redis_url=fresh_redis.url if kind == "redis" else None)
    backend = ns["backend"]
    try:
        assert type(backend).__name__ == {"memory": "InMemoryBackend", "manager": "ManagerBackend",
                                          "redis": "RedisBackend"}[kind]
        meta = SlotMetadata("thread-uuid-1", "console", "greeter", 0, "2026-01-01T00:00:00+00:00", "str")
        ns.update(thread_id="thread-uuid-1", buffer_slot=BufferSlot("hello", meta),
                  chain="console.greeter", uuid="uuid-123", slot_bytes_0=b"0", slot_bytes_1=b"1")

        run("schema_buffers", ns)
        run("schema_registry", ns)
        run("serialization", ns)
        assert ns["slot"] == ns["buffer_slot"]

        run("buffer_operations", ns)
        assert (ns["index"], ns["slots"], ns["slot"]) == (0, [ns["slot_bytes"]], ns["slot_bytes"])
        assert (ns["exists"], ns["deleted"], ns["threads"]) == (True, True, [])

        run("registry_operations", ns)
        assert (ns["uuid"], ns["chain"], ns["deleted"], ns["all_mappings"]) == \
            ("uuid-123", "console.greeter", True, {})

        capsys.readouterr()
        run("context_buffer", ns)
        run("thread_registry", ns)
        # "# True": a buffer or registry given a backend is shared, whichever backend it is
        assert capsys.readouterr().out.split() == ["True", "True"]
        ns["buffer"].append(ns["thread_id"], "payload", "console", "greeter")
        ns["registry"].start_chain("console", "greeter")

        run("info", ns)
        assert (ns["info"]["buffer_threads"], ns["info"]["registry_entries"]) == (1, 1)
        run("manual_cleanup", ns)
        assert backend.buffer_list_threads() == [] and backend.registry_list_all() == {}
        run("ping", ns)
        assert ns["is_healthy"] is True
    finally:
        backend.close()


def test_programmatic_redis_config(fresh_redis: RedisServer) -> None:
    ns = run("programmatic", {}, redis_url=fresh_redis.url)
    with ns["backend"] as backend:
        backend.buffer_append("t", b"x")
        assert backend.config.redis_prefix == "myapp:" and backend.config.redis_ttl == 3600
        assert fresh_redis.client().ttl("myapp:buffer:{t}") > 3500


def test_testing_snippet_passes_under_pytest(tmp_path: Path) -> None:
    test_file = tmp_path / "test_from_spec.py"
    test_file.write_text(SNIPPETS["testing"])
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                             str(test_file)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0 and "1 passed" in result.stdout, textwrap.shorten(result.stdout, 2000)


# -- the ```yaml blocks: every `backend:` section loads into a BackendConfig ------------------------
YAML_SNIPPETS: dict[str, str] = {}
YAML_SNIPPETS["organism_yaml"] = '''\
backend:
  type: redis                           # memory | manager | redis
  redis_url: "redis://localhost:6379"   # Redis connection URL
  redis_prefix: "xp:"                   # Key prefix for multi-tenancy
  redis_ttl: 86400                      # Key TTL in seconds
'''
YAML_SNIPPETS["stream_pump"] = '''\
backend:
  type: redis
  redis_url: "redis://localhost:6379"
process_pool:
  workers: 4
listeners:
  - name: analyzer
    cpu_bound: true    # Uses shared backend for data exchange
'''
YAML_SNIPPETS["redis_ttl"] = '''\
backend:
  redis_ttl: 86400   # Keys expire after 24 hours
'''
YAML_SNIPPETS["multi_tenancy"] = '''\
# Organism A
backend:
  type: redis
  redis_prefix: "orgA:"
# Organism B
backend:
  type: redis
  redis_prefix: "orgB:"
'''


@pytest.mark.parametrize("name, expected", [
    ("organism_yaml", ("redis", "redis://localhost:6379", "xp:", 86400)),
    ("stream_pump", ("redis", "redis://localhost:6379", "xp:", 86400)),
    ("redis_ttl", ("memory", "redis://localhost:6379", "xp:", 86400)),
    # two organisms' files shown in one block: as one document, the second `backend:` wins
    ("multi_tenancy", ("redis", "redis://localhost:6379", "orgB:", 86400)),
])
def test_yaml_blocks_load(tmp_path: Path, name: str, expected: tuple[object, ...]) -> None:
    from xml_pipeline.memory import BackendConfig
    path = tmp_path / "organism.yaml"
    path.write_text(YAML_SNIPPETS[name])
    config = BackendConfig.from_yaml(path)
    assert (config.backend_type, config.redis_url, config.redis_prefix, config.redis_ttl) == expected
    if name == "multi_tenancy":
        organism_a = YAML_SNIPPETS[name].split("# Organism B")[0]
        path.write_text(organism_a)
        assert BackendConfig.from_yaml(path).redis_prefix == "orgA:"
