"""ThreadRegistry: opaque thread uuids ↔ call chains (xml-pipeline's semantics, on a SharedBackend).

A call chain is the path a message took, as dot-joined listener names:

    console calls router  → "console.router"
    router calls greeter  → "console.router.greeter"

Agents only ever see the uuid, never the chain. When an agent answers with <response>, the
registry prunes the last hop (the responder) and routes to the new last hop (the caller).

Every "get or create" is one atomic backend step (`registry_get_or_create`), so eight processes
asking for the uuid of one chain at once all get the same uuid (the naive "get, then set" hands out
several and leaves the registry pointing at whichever was written last).
"""
from __future__ import annotations

import threading
import uuid as uuid_module
import weakref
from dataclasses import dataclass

from ..errors import BackendUnavailable
from ..memory.inmemory import InMemoryBackend
from ..memory.protocol import SharedBackend

ROOT = "system"


def _new_uuid() -> str:
    return str(uuid_module.uuid4())


def _check_hop(name: object, what: str) -> str:
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"{what} must be a listener name (non-empty, without '.'), got {name!r}")
    return name


def _check_chain(chain: object) -> str:
    if not isinstance(chain, str) or not chain or any(not part for part in chain.split(".")):
        raise ValueError(f"chain must be dot-joined listener names like 'console.router', got {chain!r}")
    return chain


@dataclass
class _RootState:
    """The root thread, shared by every registry get_registry() returns for one backend."""

    chain: str = ROOT
    uuid: str | None = None


class ThreadRegistry:
    """Bidirectional uuid ↔ call-chain mapping. Thread- and process-safe through its backend."""

    def __init__(self, backend: SharedBackend | None = None, *, _root: _RootState | None = None) -> None:
        """`backend=None` keeps the registry in this process (a private InMemoryBackend)."""
        self._shared = backend is not None
        self._backend: SharedBackend = backend if backend is not None else InMemoryBackend()
        self._root = _root if _root is not None else _RootState()

    @property
    def backend(self) -> SharedBackend:
        return self._backend

    @property
    def is_shared(self) -> bool:
        """True when the registry was given a backend (xml-pipeline's "shared mode"), False when it
        keeps its mappings in this process. `backend.is_shared` tells whether other processes see it."""
        return self._shared

    # -- root -----------------------------------------------------------------------------------
    def initialize_root(self, organism_name: str = "organism") -> str:
        """Create (or find) the root thread `system.<organism>`; every process gets the same uuid."""
        chain = f"{ROOT}.{_check_hop(organism_name, 'organism_name')}"
        root_uuid = self._backend.registry_get_or_create(chain, _new_uuid())
        self._root.chain, self._root.uuid = chain, root_uuid
        return root_uuid

    @property
    def root_uuid(self) -> str | None:
        return self._root.uuid

    @property
    def root_chain(self) -> str:
        return self._root.chain

    # -- chains ---------------------------------------------------------------------------------
    def get_or_create(self, chain: str) -> str:
        """The uuid of `chain`, created atomically if the chain is new."""
        return self._backend.registry_get_or_create(_check_chain(chain), _new_uuid())

    def lookup(self, thread_id: str) -> str | None:
        """The chain of a thread uuid, or None."""
        return self._backend.registry_get_chain(thread_id)

    def extend_chain(self, current_uuid: str, next_hop: str) -> str:
        """The uuid of the chain of `current_uuid` plus `next_hop` (the callee)."""
        _check_hop(next_hop, "next_hop")
        current = self._backend.registry_get_chain(current_uuid)
        return self.get_or_create(f"{current}.{next_hop}" if current else next_hop)

    def prune_for_response(self, thread_id: str) -> tuple[str | None, str | None]:
        """For a response on `thread_id`: (caller to route to, uuid of the pruned chain).

        (None, None) when the thread is unknown or its chain has one hop left (that mapping is
        removed: nobody is left to answer to).
        """
        chain = self._backend.registry_get_chain(thread_id)
        if not chain:
            return None, None
        parts = chain.split(".")
        if len(parts) <= 1:
            self._backend.registry_delete(thread_id)
            return None, None
        pruned = parts[:-1]
        return pruned[-1], self.get_or_create(".".join(pruned))

    def start_chain(self, initiator: str, target: str) -> str:
        """The uuid of a new conversation `initiator.target`."""
        return self.get_or_create(f"{_check_hop(initiator, 'initiator')}.{_check_hop(target, 'target')}")

    def register_thread(self, thread_id: str, initiator: str, target: str) -> str:
        """Adopt an externally assigned uuid for `initiator.target` (under the root, if one exists).

        Returns `thread_id` if it is (now) registered, or the uuid the chain already had: the
        chain is claimed atomically, so two processes registering one chain agree on its uuid.
        """
        _check_hop(initiator, "initiator")
        _check_hop(target, "target")
        if self._backend.registry_get_chain(thread_id):
            return thread_id
        chain = f"{self._root.chain}.{initiator}.{target}" if self._root.uuid else f"{initiator}.{target}"
        return self._backend.registry_get_or_create(chain, thread_id)

    def cleanup(self, thread_id: str) -> None:
        """Forget a thread uuid (both directions)."""
        self._backend.registry_delete(thread_id)

    def debug_dump(self) -> dict[str, str]:
        """Every mapping as {uuid: chain}."""
        return self._backend.registry_list_all()

    def clear(self) -> None:
        """Forget every mapping and the root (testing)."""
        self._backend.registry_clear()
        self._root.chain, self._root.uuid = ROOT, None

    def __repr__(self) -> str:
        return f"ThreadRegistry(backend={self._backend!r}, root={self._root.chain!r})"


_lock = threading.Lock()
_default_registry: ThreadRegistry | None = None
_roots: "weakref.WeakKeyDictionary[SharedBackend, _RootState]" = weakref.WeakKeyDictionary()


def get_registry(backend: SharedBackend | None = None) -> ThreadRegistry:
    """The thread registry on `backend`; without one, the process-wide registry on the configured
    backend (the same backend get_context_buffer() uses).

    Registries returned for the same backend share their root, so `initialize_root` through one is
    seen by the next. Unlike the original singleton, a `backend` passed here is never ignored.
    """
    global _default_registry
    with _lock:
        if backend is None:
            if _default_registry is None:
                from ..memory.factory import default_backend
                shared_backend = default_backend()
                _default_registry = ThreadRegistry(shared_backend)
                # No backend was asked for: "shared" only if the configured one reaches other processes.
                _default_registry._shared = bool(shared_backend.is_shared)
            return _default_registry
        try:
            root = _roots.setdefault(backend, _RootState())
        except TypeError:  # a backend that cannot be weakly referenced: no sharing
            root = _RootState()
        return ThreadRegistry(backend, _root=root)


def reset_registry(*, clear: bool = True) -> None:
    """Clear the process-wide registry's mappings (unless `clear=False`), then forget it (tests),
    as xml-pipeline does. Its backend stays open (reset_shared_backend() closes it)."""
    global _default_registry
    with _lock:
        registry, _default_registry = _default_registry, None
    if registry is not None and clear:
        try:
            registry.clear()
        except BackendUnavailable:
            pass  # its backend is closed or gone: nothing left that a later registry could see
