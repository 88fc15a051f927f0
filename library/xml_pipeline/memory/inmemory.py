"""InMemoryBackend: the single-process backend, and the store behind the ManagerBackend's server.

One lock guards everything, so each operation is atomic exactly like one Redis script: the index of
an append is the list length under the lock, the `max_slots` check and the `append_id` dedup happen
in the same step.

TTL is emulated with Redis's semantics, so the contract suite is the same for every backend:
every key (buffer, chain, uuid, op, tmp) has its own deadline; a key past its deadline is gone (it
is purged when touched, and a periodic sweep frees the memory of keys nobody touches); a write to a
thread sets the deadline of its buffer and of its registry entries together (sliding expiry); reads
never extend a deadline.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from types import TracebackType
from typing import Any

from ..errors import AppendIdConflict, BackendUnavailable, ThreadFullError
from .config import BackendConfig
from .keys import check_tagged_id
from .protocol import Appended
from .serialization import default_signer
from .signing import Signer

#: Lifetime of append_id records and temp entries when no TTL is configured (24 h).
DEFAULT_OP_TTL = 86400

_BUF, _CHAIN, _UUID, _TMP = "buffer", "chain", "uuid", "tmp"


def check_thread_id(thread_id: object, what: str = "thread_id") -> str:
    # The same rule as the Redis backend (the id becomes a hash tag there), so code that works on
    # memory works on Redis.
    return check_tagged_id(thread_id, what)


def check_name(field: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{field} must be a non-empty string, got {value!r}")
    return value


def check_blob(slot: object) -> bytes:
    if isinstance(slot, bytes):
        return slot
    if isinstance(slot, (bytearray, memoryview)):
        return bytes(slot)
    raise TypeError(f"slot must be bytes (a serialized slot), got {type(slot).__name__}")


class InMemoryBackend:
    """Thread-safe, single-process storage with Redis-like TTL semantics."""

    def __init__(self, config: BackendConfig | None = None, *, signer: Signer | None = None) -> None:
        self.config = config if config is not None else BackendConfig(backend_type="memory")
        self._ttl: int | None = self.config.ttl
        self._signer = signer or self.config.signer() or default_signer()
        self._lock = threading.Lock()
        self._closed = False
        self._buffers: dict[str, list[bytes]] = {}
        self._chain_to_uuid: dict[str, str] = {}
        self._uuid_to_chain: dict[str, str] = {}
        self._temp: dict[str, bytes] = {}
        # thread id -> {append_id: (index, deadline)}
        self._ops: dict[str, dict[str, tuple[int, float]]] = {}
        # (key space, name) -> monotonic deadline; keys without an entry never expire
        self._expires: dict[tuple[str, str], float] = {}
        self._sweep_every = min(60.0, max(0.25, (self._ttl or DEFAULT_OP_TTL) / 4))
        self._next_sweep = time.monotonic() + self._sweep_every

    # -- properties -----------------------------------------------------------------------------
    @property
    def is_shared(self) -> bool:
        return False

    @property
    def signer(self) -> Signer:
        return self._signer

    @property
    def slot_namespace(self) -> str:
        return "memory"

    @property
    def ttl(self) -> int | None:
        return self._ttl

    # -- expiry machinery (call with the lock held) ---------------------------------------------
    def _now(self) -> float:
        if self._closed:
            raise BackendUnavailable("the memory backend is closed")
        now = time.monotonic()
        if now >= self._next_sweep:
            self._sweep(now)
        return now

    def _sweep(self, now: float) -> None:
        self._next_sweep = now + self._sweep_every
        for key, deadline in list(self._expires.items()):
            if deadline <= now:
                self._purge(key)
        for thread_id, ops in list(self._ops.items()):
            for op_id, (_, deadline) in list(ops.items()):
                if deadline <= now:
                    del ops[op_id]
            if not ops:
                del self._ops[thread_id]

    def _purge(self, key: tuple[str, str]) -> None:
        self._expires.pop(key, None)
        space, name = key
        if space == _BUF:
            self._buffers.pop(name, None)
        elif space == _CHAIN:
            self._chain_to_uuid.pop(name, None)
        elif space == _UUID:
            self._uuid_to_chain.pop(name, None)
        else:
            self._temp.pop(name, None)

    def _expired(self, space: str, name: str, now: float) -> bool:
        deadline = self._expires.get((space, name))
        if deadline is not None and deadline <= now:
            self._purge((space, name))
            return True
        return False

    def _buffer(self, thread_id: str, now: float) -> list[bytes] | None:
        if self._expired(_BUF, thread_id, now):
            return None
        return self._buffers.get(thread_id)

    def _uuid_of(self, chain: str, now: float) -> str | None:
        if self._expired(_CHAIN, chain, now):
            return None
        return self._chain_to_uuid.get(chain)

    def _chain_of(self, uuid: str, now: float) -> str | None:
        if self._expired(_UUID, uuid, now):
            return None
        return self._uuid_to_chain.get(uuid)

    def _touch_thread(self, thread_id: str, now: float) -> None:
        """Sliding expiry: a write to a thread refreshes its buffer and its registry entries."""
        if self._ttl is None:
            return
        deadline = now + self._ttl
        # Look through the expiry checks: a key whose deadline passed (but was not swept yet) is
        # gone and must stay gone, as EXPIRE on a missing Redis key does nothing.
        if self._buffer(thread_id, now) is not None:
            self._expires[(_BUF, thread_id)] = deadline
        chain = self._chain_of(thread_id, now)
        if chain is not None:
            self._expires[(_UUID, thread_id)] = deadline
            if self._uuid_of(chain, now) == thread_id:
                self._expires[(_CHAIN, chain)] = deadline

    def _drop_mapping(self, chain: str | None, uuid: str | None) -> None:
        if chain is not None:
            self._chain_to_uuid.pop(chain, None)
            self._expires.pop((_CHAIN, chain), None)
        if uuid is not None:
            self._uuid_to_chain.pop(uuid, None)
            self._expires.pop((_UUID, uuid), None)

    def _set_mapping(self, chain: str, uuid: str, now: float) -> None:
        old_uuid = self._uuid_of(chain, now)
        if old_uuid is not None and old_uuid != uuid and self._chain_of(old_uuid, now) == chain:
            self._drop_mapping(None, old_uuid)  # the stale reverse entry
        old_chain = self._chain_of(uuid, now)
        if old_chain is not None and old_chain != chain and self._uuid_of(old_chain, now) == uuid:
            self._drop_mapping(old_chain, None)  # the uuid's previous chain no longer points at it
        self._chain_to_uuid[chain] = uuid
        self._uuid_to_chain[uuid] = chain
        if self._ttl is None:
            self._expires.pop((_CHAIN, chain), None)
            self._expires.pop((_UUID, uuid), None)
        self._touch_thread(uuid, now)

    # -- Context Buffer -------------------------------------------------------------------------
    def buffer_append(self, thread_id: str, slot_data: bytes, *, max_slots: int | None = None,
                      append_id: str | None = None) -> int:
        blob, append_id = self._check_append(thread_id, slot_data, max_slots, append_id)
        with self._lock:
            now = self._now()
            done = self._repeat(thread_id, append_id, now)
            if done is not None:
                if done.stored != blob:
                    raise AppendIdConflict(thread_id, append_id or "", done.position)
                return done.position  # a retry of an append that was stored: store nothing
            return self._store(thread_id, blob, max_slots, append_id, now)

    def buffer_append_at(self, thread_id: str, slot: bytes, index: int, *, max_slots: int | None = None,
                         append_id: str | None = None, items: Sequence[tuple[str, bytes]] = ()) -> Appended:
        blob, append_id = self._check_append(thread_id, slot, max_slots, append_id)
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise ValueError(f"index must be an integer >= 0, got {index!r}")
        with self._lock:
            now = self._now()
            outcome = self._repeat(thread_id, append_id, now)
            if outcome is None:
                slots = self._buffer(thread_id, now)
                length = len(slots) if slots else 0
                if length != index:
                    return Appended("moved", length)
                outcome = Appended("stored", self._store(thread_id, blob, max_slots, append_id, now))
        for key, value in items:
            self.temp_put(key, value)
        return outcome

    @staticmethod
    def _check_append(thread_id: str, slot: bytes, max_slots: int | None,
                      append_id: str | None) -> tuple[bytes, str | None]:
        check_thread_id(thread_id)
        blob = check_blob(slot)
        if max_slots is not None and (isinstance(max_slots, bool) or not isinstance(max_slots, int)
                                      or max_slots < 1):
            raise ValueError(f"max_slots must be None or an integer >= 1, got {max_slots!r}")
        if append_id is not None and (not isinstance(append_id, str) or not append_id):
            raise ValueError(f"append_id must be a non-empty string, got {append_id!r}")
        return blob, append_id

    def _repeat(self, thread_id: str, append_id: str | None, now: float) -> Appended | None:
        """The recorded outcome of `append_id` in this thread, if any (call with the lock held)."""
        if append_id is None:
            return None
        done = self._ops.get(thread_id, {}).get(append_id)
        if done is None or done[1] <= now:
            return None
        slots = self._buffer(thread_id, now)
        stored = slots[done[0]] if slots and done[0] < len(slots) else None
        return Appended("repeat", done[0], stored)

    def _store(self, thread_id: str, blob: bytes, max_slots: int | None, append_id: str | None, now: float) -> int:
        slots = self._buffer(thread_id, now)
        if slots is None:
            slots = self._buffers[thread_id] = []
        if max_slots is not None and len(slots) >= max_slots:
            if not slots:
                del self._buffers[thread_id]
            raise ThreadFullError(thread_id, max_slots)
        index = len(slots)
        slots.append(blob)
        self._touch_thread(thread_id, now)
        if append_id is not None:
            self._ops.setdefault(thread_id, {})[append_id] = (index, now + (self._ttl or DEFAULT_OP_TTL))
        return index

    def buffer_get_thread(self, thread_id: str) -> list[bytes]:
        check_thread_id(thread_id)
        with self._lock:
            slots = self._buffer(thread_id, self._now())
            return list(slots) if slots else []

    def buffer_get_slot(self, thread_id: str, index: int) -> bytes | None:
        check_thread_id(thread_id)
        if isinstance(index, bool) or not isinstance(index, int):
            raise TypeError(f"index must be an int, got {type(index).__name__}")
        with self._lock:
            slots = self._buffer(thread_id, self._now())
            if not slots or not -len(slots) <= index < len(slots):
                return None
            return slots[index]

    def buffer_thread_len(self, thread_id: str) -> int:
        check_thread_id(thread_id)
        with self._lock:
            slots = self._buffer(thread_id, self._now())
            return len(slots) if slots else 0

    def buffer_thread_exists(self, thread_id: str) -> bool:
        return self.buffer_thread_len(thread_id) > 0

    def buffer_delete_thread(self, thread_id: str) -> bool:
        check_thread_id(thread_id)
        with self._lock:
            existed = self._buffer(thread_id, self._now()) is not None
            self._buffers.pop(thread_id, None)
            self._expires.pop((_BUF, thread_id), None)
            self._ops.pop(thread_id, None)
            return existed

    def buffer_list_threads(self) -> list[str]:
        with self._lock:
            now = self._now()
            return sorted(t for t in list(self._buffers) if self._buffer(t, now) is not None)

    def buffer_clear(self) -> int:
        with self._lock:
            now = self._now()
            count = sum(1 for t in list(self._buffers) if self._buffer(t, now) is not None)
            for t in self._buffers:
                self._expires.pop((_BUF, t), None)
            self._buffers.clear()
            self._ops.clear()
            return count

    # -- Thread Registry ------------------------------------------------------------------------
    def registry_set(self, chain: str, uuid: str) -> None:
        check_name("chain", chain)
        check_thread_id(uuid, "uuid")
        with self._lock:
            self._set_mapping(chain, uuid, self._now())

    def registry_get_or_create(self, chain: str, uuid: str) -> str:
        check_name("chain", chain)
        check_thread_id(uuid, "uuid")
        with self._lock:
            now = self._now()
            existing = self._uuid_of(chain, now)
            if existing is not None:
                self._touch_thread(existing, now)  # the chain is in use: keep it alive
                return existing
            self._set_mapping(chain, uuid, now)
            return uuid

    def registry_get_uuid(self, chain: str) -> str | None:
        check_name("chain", chain)
        with self._lock:
            return self._uuid_of(chain, self._now())

    def registry_get_chain(self, uuid: str) -> str | None:
        check_thread_id(uuid, "uuid")
        with self._lock:
            return self._chain_of(uuid, self._now())

    def registry_delete(self, uuid: str) -> bool:
        check_thread_id(uuid, "uuid")
        with self._lock:
            chain = self._chain_of(uuid, self._now())
            if chain is None:
                return False
            self._drop_mapping(chain if self._chain_to_uuid.get(chain) == uuid else None, uuid)
            return True

    def registry_list_all(self) -> dict[str, str]:
        with self._lock:
            now = self._now()
            return {u: c for c, u in list(self._chain_to_uuid.items()) if not self._expired(_CHAIN, c, now)}

    def registry_clear(self) -> int:
        with self._lock:
            now = self._now()
            count = sum(1 for c in list(self._chain_to_uuid) if not self._expired(_CHAIN, c, now))
            for key in [k for k in self._expires if k[0] in (_CHAIN, _UUID)]:
                del self._expires[key]
            self._chain_to_uuid.clear()
            self._uuid_to_chain.clear()
            return count

    # -- Temporary data -------------------------------------------------------------------------
    def temp_put(self, key: str, data: bytes, *, ttl: int | None = None) -> None:
        check_thread_id(key, "temp key")
        blob = check_blob(data)
        if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, int) or ttl <= 0):
            raise ValueError(f"ttl must be a positive number of seconds, got {ttl!r}")
        with self._lock:
            now = self._now()
            self._temp[key] = blob
            self._expires[(_TMP, key)] = now + (ttl or self._ttl or DEFAULT_OP_TTL)

    def temp_get(self, key: str) -> bytes | None:
        check_thread_id(key, "temp key")
        with self._lock:
            if self._expired(_TMP, key, self._now()):
                return None
            return self._temp.get(key)

    def temp_delete(self, *keys: str) -> int:
        with self._lock:
            now = self._now()
            count = 0
            for key in keys:
                check_thread_id(key, "temp key")
                if not self._expired(_TMP, key, now) and self._temp.pop(key, None) is not None:
                    count += 1
                self._expires.pop((_TMP, key), None)
            return count

    def temp_put_many(self, items: list[tuple[str, bytes]]) -> None:
        for key, data in items:
            self.temp_put(key, data)

    def temp_get_many(self, keys: list[str]) -> list[bytes | None]:
        return [self.temp_get(k) for k in keys]

    def temp_take(self, key: str, *also_delete: str) -> bytes | None:
        try:
            return self.temp_get(key)
        finally:
            self.temp_delete(key, *also_delete)

    # -- Lifecycle and monitoring ---------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        with self._lock:
            now = self._now()
            self._sweep(now)
            return {
                "backend": "memory",
                "buffer_threads": len(self._buffers),
                "registry_entries": len(self._chain_to_uuid),
                "total_slots": sum(len(s) for s in self._buffers.values()),
                "temp_entries": len(self._temp),
                "ttl": self._ttl,
            }

    @property
    def closed(self) -> bool:
        return self._closed

    def ping(self) -> bool:
        return not self._closed

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._buffers.clear()
            self._chain_to_uuid.clear()
            self._uuid_to_chain.clear()
            self._temp.clear()
            self._ops.clear()
            self._expires.clear()

    def __enter__(self) -> "InMemoryBackend":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __reduce__(self) -> tuple[Any, ...]:
        # A copy in another process would silently diverge: say what to use instead.
        raise TypeError("InMemoryBackend lives in one process and cannot be pickled; "
                        "use backend_type 'manager' or 'redis' to share data between processes")

    def __repr__(self) -> str:
        return f"InMemoryBackend(ttl={self._ttl}, closed={self._closed})"
