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

`is_shared` and `get_stats()["backend"]` say what xml-pipeline's say: whether a backend was given
("shared") or the buffer keeps its history in this process ("local"). Whether other processes can
see the backend is `backend.is_shared`.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from datetime import datetime, timezone
from typing import Any

from ..errors import BackendError, BackendUnavailable
from .handler_metadata import HandlerMetadata, slot_to_handler_metadata
from .inmemory import InMemoryBackend, check_thread_id
from .protocol import SharedBackend
from .serialization import deserialize_slot, serialize_slot
from .slots import UNASSIGNED, BufferSlot, SlotMetadata
from .thread_context import ThreadContext

__all__ = ["ContextBuffer", "ThreadContext", "BufferSlot", "SlotMetadata", "HandlerMetadata",
           "get_context_buffer", "reset_context_buffer", "slot_to_handler_metadata"]

DEFAULT_MAX_SLOTS_PER_THREAD = 10_000
DEFAULT_MAX_THREADS = 1_000


class ContextBuffer:
    """The context buffer of an organism: one append-only log of slots per thread."""

    def __init__(self, backend: SharedBackend | None = None, *,
                 max_slots_per_thread: int = DEFAULT_MAX_SLOTS_PER_THREAD,
                 max_threads: int = DEFAULT_MAX_THREADS) -> None:
        """`backend=None` keeps the history in this process (a private InMemoryBackend).

        `max_threads` applies to such a local buffer only: a new thread beyond it evicts the oldest
        (xml-pipeline's rule). On a backend, threads end by TTL or delete_thread instead.
        """
        for name, value in (("max_slots_per_thread", max_slots_per_thread), ("max_threads", max_threads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        self._shared = backend is not None
        self._backend: SharedBackend = backend if backend is not None else InMemoryBackend()
        self.max_slots_per_thread = max_slots_per_thread
        self.max_threads = max_threads
        self._lock = threading.Lock()
        # Local buffers: thread ids oldest first (max_threads eviction). Live views handed out by
        # get_or_create_thread, so asking twice gives the same object.
        self._order: OrderedDict[str, None] = OrderedDict()
        self._views: OrderedDict[str, ThreadContext] = OrderedDict()

    @property
    def backend(self) -> SharedBackend:
        return self._backend

    @property
    def is_shared(self) -> bool:
        """True when the buffer was given a backend (xml-pipeline's "shared mode"), False for a
        buffer that keeps its history in this process. `backend.is_shared` tells whether other
        processes see the backend."""
        return self._shared

    def get_or_create_thread(self, thread_id: str) -> ThreadContext:
        """A live view of `thread_id` (the same object for the same id): reads go to the backend,
        `append` stores through this buffer. The thread itself exists once something is appended."""
        with self._lock:
            view = self._views.get(thread_id)
            if view is None:
                view = self._views[thread_id] = ThreadContext(thread_id, buffer=self)
                while len(self._views) > self.max_threads:  # views are cheap, but not unbounded
                    self._views.popitem(last=False)
            return view

    def _admit(self, thread_id: str) -> None:
        """Local buffers: make room for a new thread by evicting the oldest beyond max_threads."""
        check_thread_id(thread_id)  # a bad id must not cost another thread its place
        with self._lock:
            if thread_id in self._order:
                return
            if len(self._order) >= self.max_threads:
                for known in list(self._order):  # forget threads that expired meanwhile
                    if not self._backend.buffer_thread_exists(known):
                        del self._order[known]
            while len(self._order) >= self.max_threads:
                oldest, _ = self._order.popitem(last=False)
                self._backend.buffer_delete_thread(oldest)
                self._views.pop(oldest, None)
            self._order[thread_id] = None

    def append(self, thread_id: str, payload: Any, from_id: str, to_id: str,
               own_name: str | None = None, is_self_call: bool = False, usage_instructions: str = "",
               *, append_id: str | None = None) -> BufferSlot:
        """Store a validated payload at the end of `thread_id`'s log and return its slot.

        `append_id` makes a retry of this append (after a timeout, say) return the first call's slot
        index instead of storing the slot twice. Raises ThreadFullError at max_slots_per_thread.
        """
        if not self._shared:
            self._admit(thread_id)
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
        with self._lock:
            self._order.pop(thread_id, None)
        return self._backend.buffer_delete_thread(thread_id)

    def get_stats(self) -> dict[str, Any]:
        """xml-pipeline's keys (thread_count, total_slots, max_threads, max_slots_per_thread,
        threads, backend: "shared" | "local") plus backend_type (memory | manager | redis)."""
        threads = self._backend.buffer_list_threads()
        return {
            "thread_count": len(threads),
            "total_slots": sum(self._backend.buffer_thread_len(t) for t in threads),
            "max_threads": self.max_threads,
            "max_slots_per_thread": self.max_slots_per_thread,
            "threads": threads,
            "backend": "shared" if self._shared else "local",
            "backend_type": getattr(getattr(self._backend, "config", None), "backend_type",
                                    type(self._backend).__name__),
        }

    def clear(self) -> None:
        """Delete every thread (testing)."""
        with self._lock:
            self._order.clear()
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
            backend = default_backend()
            _default_buffer = ContextBuffer(backend)
            # No backend was asked for: "shared" only if the configured one reaches other processes.
            _default_buffer._shared = bool(backend.is_shared)
        return _default_buffer


def reset_context_buffer() -> None:
    """Clear the process-wide buffer's threads, then forget it (tests), as xml-pipeline does.

    Its backend stays open (reset_shared_backend() closes it)."""
    global _default_buffer
    with _default_lock:
        buffer, _default_buffer = _default_buffer, None
    if buffer is not None:
        try:
            buffer.clear()
        except BackendUnavailable:
            pass  # its backend is closed or gone: nothing left that a later buffer could see


def forget_context_buffer() -> None:
    """Forget the process-wide buffer without touching its data."""
    global _default_buffer
    with _default_lock:
        _default_buffer = None
