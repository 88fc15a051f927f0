"""SharedBackend: the operations every backend (memory, manager, redis) provides.

Backends store opaque bytes. Callers that store pickles (ContextBuffer, the pump's worker data
flow) wrap them in signed envelopes first (see signing.py); a backend never unpickles anything.

Guarantees every backend gives (the contract suite in tests/library checks all three):
- `buffer_append` assigns the slot's index atomically: the index is the slot's position in the
  thread's log, even with many processes appending to one thread at once.
- With `append_id`, an append retried after a timeout is stored once: a repeated call with the same
  id and the same bytes (within the TTL, or 24 h without one) returns the first call's index and
  stores nothing; the same id with different bytes raises AppendIdConflict and stores nothing.
- `buffer_append_at(thread, slot, index)` is the compare-and-append ContextBuffer uses to sign each
  slot for its position: it stores only if the thread holds exactly `index` slots (see Appended).
- With `max_slots`, the limit is checked in the same atomic step as the append (ThreadFullError).
- With a TTL, every key exists only with an expiry, and each write to a thread refreshes the TTL of
  its buffer and of its registry entries together (sliding expiry).
- `registry_set(chain, uuid)` keeps both directions consistent (a stale reverse entry is removed).
- The temp batches (`temp_put_many`, `temp_get_many`, `temp_take`, `buffer_append_at` with items)
  are the single operations, one round trip each; the pump reaches them through its async face
  (store.py).
"""
from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType
from typing import Any, Literal, NamedTuple, Protocol, runtime_checkable

from .config import BackendConfig
from .signing import Signer


class Appended(NamedTuple):
    """What `buffer_append_at` did.

    - "stored": the slot is now at `position` (the index asked for).
    - "moved": the thread holds `position` slots, not the number asked for; nothing was stored (sign
      the slot for that index and try again).
    - "repeat": the append id was already recorded, for the slot at `position`; nothing was stored.
      `stored` is that slot's blob (None if it is gone), for the caller to decide whether this is
      really the same append.
    """

    status: Literal["stored", "moved", "repeat"]
    position: int
    stored: bytes | None = None


@runtime_checkable
class SharedBackend(Protocol):
    """Storage for the Context Buffer and the Thread Registry, shared between processes."""

    config: BackendConfig

    @property
    def is_shared(self) -> bool:
        """True when other processes see the same data (manager, redis)."""
        ...

    @property
    def closed(self) -> bool:
        """True once close() was called (the backend refuses every operation from then on)."""
        ...

    @property
    def signer(self) -> Signer:
        """Key ring used for the signed envelopes of everything stored through this backend."""
        ...

    @property
    def slot_namespace(self) -> str:
        """What a slot's signature binds besides its thread and index (the Redis prefix)."""
        ...

    # -- Context Buffer -------------------------------------------------------------------------
    def buffer_append(self, thread_id: str, slot_data: bytes, *, max_slots: int | None = None,
                      append_id: str | None = None) -> int: ...
    def buffer_append_at(self, thread_id: str, slot: bytes, index: int, *, max_slots: int | None = None,
                         append_id: str | None = None, items: Sequence[tuple[str, bytes]] = ()) -> Appended:
        """Compare-and-append: store `slot` only if the thread holds exactly `index` slots, then
        temp_put each of `items` (values already signed). Raises ThreadFullError at max_slots."""
        ...
    def buffer_get_thread(self, thread_id: str) -> list[bytes]: ...
    def buffer_get_slot(self, thread_id: str, index: int) -> bytes | None: ...
    def buffer_thread_len(self, thread_id: str) -> int: ...
    def buffer_thread_exists(self, thread_id: str) -> bool: ...
    def buffer_delete_thread(self, thread_id: str) -> bool: ...
    def buffer_list_threads(self) -> list[str]: ...
    def buffer_clear(self) -> int: ...

    # -- Thread Registry ------------------------------------------------------------------------
    def registry_set(self, chain: str, uuid: str) -> None: ...
    def registry_get_or_create(self, chain: str, uuid: str) -> str:
        """Atomically map `chain` to `uuid` unless it is mapped already; return the winning uuid."""
        ...
    def registry_get_uuid(self, chain: str) -> str | None: ...
    def registry_get_chain(self, uuid: str) -> str | None: ...
    def registry_delete(self, uuid: str) -> bool: ...
    def registry_list_all(self) -> dict[str, str]:
        """All mappings as {uuid: chain}."""
        ...
    def registry_clear(self) -> int: ...

    # -- Temporary data (worker data flow): own key space, never a thread, always with the TTL --
    def temp_put(self, key: str, data: bytes, *, ttl: int | None = None) -> None: ...
    def temp_get(self, key: str) -> bytes | None: ...
    def temp_delete(self, *keys: str) -> int: ...
    # Batches: the same operations, one round trip each (the worker data flow's steps).
    def temp_put_many(self, items: list[tuple[str, bytes]]) -> None:
        """temp_put of each (key, data), with the backend's TTL."""
        ...
    def temp_get_many(self, keys: list[str]) -> list[bytes | None]: ...
    def temp_take(self, key: str, *also_delete: str) -> bytes | None:
        """temp_get(key), then temp_delete(key, *also_delete) whether or not the get worked."""
        ...

    # -- Lifecycle and monitoring ---------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """At least {'backend': type, 'buffer_threads': n, 'registry_entries': m}."""
        ...
    def ping(self) -> bool:
        """True if the store answers; never raises."""
        ...
    def close(self) -> None: ...
    def __enter__(self) -> "SharedBackend": ...
    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None: ...
