"""The pump's thread registry: ThreadRegistry's routing operations as coroutines, with a cache.

Routing asks for the same few chains over and over ("system.demo.console.greeter"), and a mapping,
once made, only changes when it expires or is deleted. So every chain ↔ uuid answer the backend
gives is remembered for `max_age` seconds (well inside the backend's TTL, which every append to the
thread slides): a pump never routes on a mapping the backend dropped long ago. A lookup answered
from the cache returns at once (the coroutine never suspends); a miss asks the backend in the
store's io threads (`AsyncStore.run`) and remembers the answer. A miss never routes differently
from a hit: both answer what the backend holds (or held less than max_age ago), the miss later.

The operations and their semantics are ThreadRegistry's (thread_registry.py); the pump's other
callers (tests, the CLI) keep using the blocking ThreadRegistry over the same backend.
"""
from __future__ import annotations

import time
import uuid as uuid_module

from ..memory.protocol import SharedBackend
from ..memory.store import AsyncStore
from .thread_registry import ThreadRegistry, _check_chain, _check_hop

#: Cached mappings beyond this are all forgotten at once (bounded memory, no LRU bookkeeping).
MAX_CACHED = 50_000


class RegistryCache:
    """chain ↔ uuid answers of the backend, each good for `max_age` seconds. Event-loop only."""

    def __init__(self, max_age: float) -> None:
        self.max_age = max_age
        self._uuid_of: dict[str, tuple[str, float]] = {}
        self._chain_of: dict[str, tuple[str, float]] = {}

    def uuid(self, chain: str) -> str | None:
        hit = self._uuid_of.get(chain)
        return hit[0] if hit is not None and hit[1] > time.monotonic() else None

    def chain(self, uuid: str) -> str | None:
        hit = self._chain_of.get(uuid)
        return hit[0] if hit is not None and hit[1] > time.monotonic() else None

    def remember(self, chain: str, uuid: str) -> None:
        if len(self._uuid_of) > MAX_CACHED:
            self.forget()
        deadline = time.monotonic() + self.max_age
        self._uuid_of[chain] = (uuid, deadline)
        self._chain_of[uuid] = (chain, deadline)

    def forget(self) -> None:
        self._uuid_of.clear()
        self._chain_of.clear()


class PumpRegistry:
    """ThreadRegistry's lookups, get-or-create and chain edits for the pump's event loop."""

    def __init__(self, registry: ThreadRegistry, store: AsyncStore, max_age: float) -> None:
        """`registry`: the blocking registry on the same backend (its root is shared)."""
        self._registry = registry
        self._backend: SharedBackend = registry.backend
        self._store = store
        self.cache = RegistryCache(max_age)

    @property
    def root_chain(self) -> str:
        return self._registry.root_chain

    @property
    def root_uuid(self) -> str | None:
        return self._registry.root_uuid

    async def lookup(self, thread_id: str) -> str | None:
        """The chain of a thread uuid, or None."""
        chain = self.cache.chain(thread_id)
        if chain is not None:
            return chain
        chain = await self._store.run(self._backend.registry_get_chain, thread_id)
        if chain is not None:
            self.cache.remember(chain, thread_id)
        return chain

    async def get_or_create(self, chain: str, candidate: str | None = None) -> str:
        """The uuid of `chain`, created atomically (as `candidate`, default a new uuid) if it is new."""
        uuid = self.cache.uuid(chain)
        if uuid is not None:
            return uuid
        winner = await self._store.run(self._backend.registry_get_or_create, _check_chain(chain),
                                       candidate or str(uuid_module.uuid4()))
        self.cache.remember(chain, winner)
        return winner

    async def extend_chain(self, current_uuid: str, next_hop: str) -> str:
        """The uuid of the chain of `current_uuid` plus `next_hop` (the callee)."""
        _check_hop(next_hop, "next_hop")
        current = await self.lookup(current_uuid)
        return await self.get_or_create(f"{current}.{next_hop}" if current else next_hop)

    async def prune_for_response(self, thread_id: str) -> tuple[str | None, str | None]:
        """For a response on `thread_id`: (caller to route to, uuid of the pruned chain); (None,
        None) when the thread is unknown or has one hop left (that mapping is removed)."""
        chain = await self.lookup(thread_id)
        if not chain:
            return None, None
        parts = chain.split(".")
        if len(parts) <= 1:
            self.cache.forget()
            await self._store.run(self._backend.registry_delete, thread_id)
            return None, None
        pruned = parts[:-1]
        return pruned[-1], await self.get_or_create(".".join(pruned))

    async def register_thread(self, thread_id: str, initiator: str, target: str) -> str:
        """Adopt an external uuid for `initiator.target` (under the root): `thread_id`, or the uuid
        the chain already had (claimed atomically)."""
        _check_hop(initiator, "initiator")
        _check_hop(target, "target")
        if await self.lookup(thread_id):
            return thread_id
        root = self._registry.root_chain
        chain = f"{root}.{initiator}.{target}" if self._registry.root_uuid else f"{initiator}.{target}"
        return await self.get_or_create(chain, thread_id)
