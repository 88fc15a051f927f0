"""ContextBuffer: thread-scoped, append-only message history on top of a SharedBackend.

Same shape as xml-pipeline's: `append(thread_id, payload, from_id, to_id, ...)` returns a frozen
BufferSlot; `get_thread`, `get_thread_slots`, `thread_exists`, `delete_thread`, `get_stats`.

What is different, and why:
- A slot's index is assigned by the backend in the same atomic step that stores it (never "read
  the length, then append", which hands two concurrent writers the same index). The stored blob
  carries slot_index = -1; every slot this class returns has `metadata.slot_index` = its position.
- The per-thread limit is checked by the backend in that same step (`max_slots`), so it holds with
  many processes appending at once; a full thread raises ThreadFullError and stores nothing.
- Slots are signed with the backend's key ring and verified before unpickling (serialization.py).
"""
from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

from ..errors import BackendError
from .inmemory import InMemoryBackend
from .protocol import SharedBackend
from .serialization import deserialize_slot, serialize_slot
from .slots import UNASSIGNED, BufferSlot, SlotMetadata

DEFAULT_MAX_SLOTS_PER_THREAD = 10_000


class ThreadContext:
    """A read-only snapshot of one thread's slots (what `get_thread` returns)."""

    __slots__ = ("thread_id", "_slots")

    def __init__(self, thread_id: str, slots: list[BufferSlot]) -> None:
        self.thread_id = thread_id
        self._slots = tuple(slots)

    def __len__(self) -> int:
        return len(self._slots)

    def __getitem__(self, index: int) -> BufferSlot:
        return self._slots[index]

    def __iter__(self) -> Iterator[BufferSlot]:
        return iter(self._slots)

    def get_slice(self, start: int = 0, end: int | None = None) -> list[BufferSlot]:
        return list(self._slots[start:end])

    def get_by_type(self, payload_type: str) -> list[BufferSlot]:
        return [s for s in self._slots if s.metadata.payload_type == payload_type]

    def get_from(self, from_id: str) -> list[BufferSlot]:
        return [s for s in self._slots if s.from_id == from_id]

    def __repr__(self) -> str:
        return f"ThreadContext({self.thread_id!r}, slots={len(self._slots)})"


class ContextBuffer:
    """The context buffer of an organism: one append-only log of slots per thread."""

    def __init__(self, backend: SharedBackend | None = None, *,
                 max_slots_per_thread: int = DEFAULT_MAX_SLOTS_PER_THREAD) -> None:
        """`backend=None` keeps the history in this process (a private InMemoryBackend)."""
        if isinstance(max_slots_per_thread, bool) or not isinstance(max_slots_per_thread, int) \
                or max_slots_per_thread < 1:
            raise ValueError(f"max_slots_per_thread must be an integer >= 1, got {max_slots_per_thread!r}")
        self._backend: SharedBackend = backend if backend is not None else InMemoryBackend()
        self.max_slots_per_thread = max_slots_per_thread

    @property
    def backend(self) -> SharedBackend:
        return self._backend

    @property
    def is_shared(self) -> bool:
        """True when other processes see this buffer (manager or redis backend)."""
        return bool(self._backend.is_shared)

    def append(self, thread_id: str, payload: Any, from_id: str, to_id: str,
               own_name: str | None = None, is_self_call: bool = False, usage_instructions: str = "",
               *, append_id: str | None = None) -> BufferSlot:
        """Store a validated payload at the end of `thread_id`'s log and return its slot.

        `append_id` makes a retry of this append (after a timeout, say) return the first call's slot
        index instead of storing the slot twice. Raises ThreadFullError at max_slots_per_thread.
        """
        slot, blob = self._slot(thread_id, payload, from_id, to_id, own_name, is_self_call, usage_instructions)
        index = self._backend.buffer_append(thread_id, blob, max_slots=self.max_slots_per_thread,
                                            append_id=append_id)
        return slot.at_index(index)

    def append_and_put(self, thread_id: str, payload: Any, from_id: str, to_id: str, own_name: str | None = None,
                       *, append_id: str | None = None, temps: list[tuple[str, bytes]]) -> BufferSlot:
        """append(), then temp_put(key, value) of each of `temps` (values already signed).

        On backends that offer it (manager, redis) both travel in one round trip; the append is
        still the backend's own atomic append, and a full thread raises before anything is stored.
        """
        slot, blob = self._slot(thread_id, payload, from_id, to_id, own_name, False, "")
        both = getattr(self._backend, "buffer_append_and_put", None)
        if both is not None:
            index = both(thread_id, blob, max_slots=self.max_slots_per_thread, append_id=append_id, items=temps)
        else:
            index = self._backend.buffer_append(thread_id, blob, max_slots=self.max_slots_per_thread,
                                                append_id=append_id)
            for key, value in temps:
                self._backend.temp_put(key, value)
        return slot.at_index(index)

    def prepare(self, thread_id: str, payload: Any, from_id: str, to_id: str,
                own_name: str | None = None) -> tuple[BufferSlot, bytes]:
        """The slot append() would store (index unassigned) and its signed blob, without storing it:
        for callers that send the backend's append themselves (the pump's asyncio Redis pipe)."""
        return self._slot(thread_id, payload, from_id, to_id, own_name, False, "")

    def _slot(self, thread_id: str, payload: Any, from_id: str, to_id: str, own_name: str | None,
              is_self_call: bool, usage_instructions: str) -> tuple[BufferSlot, bytes]:
        metadata = SlotMetadata(
            thread_id=thread_id,
            from_id=from_id,
            to_id=to_id,
            slot_index=UNASSIGNED,
            timestamp=datetime.now(timezone.utc).isoformat(),
            payload_type=type(payload).__name__,
            own_name=own_name,
            is_self_call=is_self_call,
            usage_instructions=usage_instructions,
        )
        slot = BufferSlot(payload=payload, metadata=metadata)
        return slot, serialize_slot(slot, signer=self._backend.signer)

    def _load(self, blob: bytes, index: int) -> BufferSlot:
        slot = deserialize_slot(blob, signer=self._backend.signer)
        if not isinstance(slot, BufferSlot):
            raise BackendError(f"slot {index} holds a {type(slot).__name__}, not a BufferSlot")
        return slot.at_index(index)

    def get_thread_slots(self, thread_id: str) -> list[BufferSlot]:
        """All slots of a thread, in order ([] for an unknown thread)."""
        return [self._load(blob, i) for i, blob in enumerate(self._backend.buffer_get_thread(thread_id))]

    def get_thread(self, thread_id: str) -> ThreadContext | None:
        """A snapshot of the thread, or None if it does not exist."""
        slots = self.get_thread_slots(thread_id)
        return ThreadContext(thread_id, slots) if slots else None

    def get_slot(self, thread_id: str, index: int) -> BufferSlot | None:
        """One slot by position (negative counts from the end), or None."""
        blob = self._backend.buffer_get_slot(thread_id, index)
        if blob is None:
            return None
        if index < 0:  # a second round trip; slots are never removed one by one, so it is stable
            index += self._backend.buffer_thread_len(thread_id)
        return self._load(blob, index)

    def thread_len(self, thread_id: str) -> int:
        return self._backend.buffer_thread_len(thread_id)

    def thread_exists(self, thread_id: str) -> bool:
        return self._backend.buffer_thread_exists(thread_id)

    def delete_thread(self, thread_id: str) -> bool:
        return self._backend.buffer_delete_thread(thread_id)

    def get_stats(self) -> dict[str, Any]:
        threads = self._backend.buffer_list_threads()
        return {
            "thread_count": len(threads),
            "total_slots": sum(self._backend.buffer_thread_len(t) for t in threads),
            "max_slots_per_thread": self.max_slots_per_thread,
            "threads": threads,
            "backend": self._backend.info().get("backend", type(self._backend).__name__),
            "is_shared": self.is_shared,
        }

    def clear(self) -> None:
        """Delete every thread (testing)."""
        self._backend.buffer_clear()

    def __repr__(self) -> str:
        return f"ContextBuffer(backend={self._backend!r}, max_slots_per_thread={self.max_slots_per_thread})"


_default_lock = threading.Lock()
_default_buffer: ContextBuffer | None = None


def get_context_buffer(backend: SharedBackend | None = None) -> ContextBuffer:
    """The context buffer on `backend`; without one, the process-wide buffer on the configured backend.

    Without an argument the backend comes from the environment (`BackendConfig.from_env()`:
    XP_BACKEND_TYPE etc., memory when nothing is set) and is shared with `get_registry()`. Unlike
    the original singleton, a `backend` passed here is never ignored.
    """
    global _default_buffer
    if backend is not None:
        return ContextBuffer(backend)
    with _default_lock:
        if _default_buffer is None:
            from .factory import default_backend
            _default_buffer = ContextBuffer(default_backend())
        return _default_buffer


def reset_context_buffer() -> None:
    """Forget the process-wide buffer (tests). Its backend is closed by reset_default_backend()."""
    global _default_buffer
    with _default_lock:
        _default_buffer = None
