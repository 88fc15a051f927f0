"""The pump's registry (pump_registry.py): cached answers, misses awaited through the store.

A miss asks the backend and remembers the answer; a remembered answer is re-read once it is older
than max_age, so a mapping the backend changed is seen within max_age; the chain operations give
what the blocking ThreadRegistry gives on the same backend.
"""
from __future__ import annotations

import asyncio

from xml_pipeline.memory import InMemoryBackend
from xml_pipeline.memory.async_store import ThreadedStore
from xml_pipeline.message_bus.pump_registry import PumpRegistry
from xml_pipeline.message_bus.thread_registry import ThreadRegistry


class CountingBackend(InMemoryBackend):
    """Counts the registry reads that reach the backend."""

    reads = 0

    def registry_get_chain(self, uuid: str) -> str | None:
        self.reads += 1
        return super().registry_get_chain(uuid)

    def registry_get_or_create(self, chain: str, uuid: str) -> str:
        self.reads += 1
        return super().registry_get_or_create(chain, uuid)


async def test_misses_go_to_the_backend_once_and_hits_never() -> None:
    backend = CountingBackend()
    store = ThreadedStore(backend, 2)
    blocking = ThreadRegistry(backend)
    blocking.initialize_root("org")
    routes = PumpRegistry(blocking, store, max_age=60)
    try:
        uuid = await routes.get_or_create("system.org.console.echo")
        assert uuid == blocking.get_or_create("system.org.console.echo")  # the same mapping
        reads = backend.reads
        for _ in range(10):
            assert await routes.get_or_create("system.org.console.echo") == uuid
            assert await routes.lookup(uuid) == "system.org.console.echo"
        assert backend.reads == reads  # every answer from the cache
        # Chain edits: the callee's thread, and the reply's way back to the caller.
        callee = await routes.extend_chain(uuid, "relay")
        assert blocking.lookup(callee) == "system.org.console.echo.relay"
        assert await routes.prune_for_response(callee) == ("echo", uuid)
        assert await routes.register_thread(uuid, "console", "echo") == uuid
        assert await routes.lookup("no-such-thread") is None
    finally:
        store.close()


async def test_a_remembered_answer_is_reread_after_max_age() -> None:
    backend = CountingBackend()
    store = ThreadedStore(backend, 2)
    blocking = ThreadRegistry(backend)
    routes = PumpRegistry(blocking, store, max_age=0.2)
    try:
        uuid = await routes.get_or_create("console.echo")
        backend.registry_set("console.echo", "replaced-uuid")  # another process re-maps the chain
        assert await routes.get_or_create("console.echo") == uuid  # within max_age: the cached answer
        await asyncio.sleep(0.3)
        assert await routes.get_or_create("console.echo") == "replaced-uuid"
        assert await routes.lookup(uuid) is None  # the stale reverse entry is gone from the backend too
        # A one-hop chain has nobody to answer to: its mapping is removed, and forgotten.
        assert await routes.prune_for_response(await routes.get_or_create("solo")) == (None, None)
        assert backend.registry_get_uuid("solo") is None
    finally:
        store.close()
