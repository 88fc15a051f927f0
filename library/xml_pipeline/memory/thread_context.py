"""ThreadContext: one thread's slots, as xml-pipeline's ContextBuffer hands them out.

Three kinds, one class:
- a snapshot (`ContextBuffer.get_thread`): the slots as they were when read; appending to it adds
  to the snapshot only, never to the buffer (as xml-pipeline's shared mode does);
- a live view (`ContextBuffer.get_or_create_thread`): every read goes to the buffer's backend and
  `append` stores through `ContextBuffer.append`, so it sees what other processes append;
- a standalone context (`ThreadContext(thread_id)`): a private, thread-safe, append-only list.
"""
from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from .slots import BufferSlot, SlotMetadata

if TYPE_CHECKING:
    from .context_buffer import ContextBuffer


class ThreadContext:
    """The append-only slots of one thread (see the module docstring for its three kinds)."""

    __slots__ = ("thread_id", "_slots", "_lock", "_buffer", "created_at")

    def __init__(self, thread_id: str, slots: Iterable[BufferSlot] = (), *,
                 buffer: ContextBuffer | None = None) -> None:
        self.thread_id = thread_id
        self._slots: list[BufferSlot] = list(slots)
        self._lock = threading.Lock()
        self._buffer = buffer
        self.created_at = datetime.now(timezone.utc)

    @property
    def is_live(self) -> bool:
        """True for a view on a ContextBuffer (reads and appends go to its backend)."""
        return self._buffer is not None

    def append(self, payload: Any, from_id: str, to_id: str, own_name: str | None = None,
               is_self_call: bool = False, usage_instructions: str = "") -> BufferSlot:
        """Append a validated payload; returns its immutable slot (with its index)."""
        if self._buffer is not None:
            return self._buffer.append(self.thread_id, payload, from_id, to_id, own_name, is_self_call,
                                       usage_instructions)
        with self._lock:
            slot = BufferSlot(payload=payload, metadata=SlotMetadata(
                thread_id=self.thread_id,
                from_id=from_id,
                to_id=to_id,
                slot_index=len(self._slots),
                timestamp=datetime.now(timezone.utc).isoformat(),
                payload_type=type(payload).__name__,
                own_name=own_name,
                is_self_call=is_self_call,
                usage_instructions=usage_instructions,
            ))
            self._slots.append(slot)
            return slot

    def _all(self) -> list[BufferSlot]:
        if self._buffer is not None:
            return self._buffer.get_thread_slots(self.thread_id)
        with self._lock:
            return list(self._slots)

    def __len__(self) -> int:
        if self._buffer is not None:
            return self._buffer.thread_len(self.thread_id)
        with self._lock:
            return len(self._slots)

    def __getitem__(self, index: int) -> BufferSlot:
        if self._buffer is not None:
            slot = self._buffer.get_slot(self.thread_id, index)
            if slot is None:
                raise IndexError(f"thread {self.thread_id!r} has no slot {index}")
            return slot
        with self._lock:
            return self._slots[index]

    def __iter__(self) -> Iterator[BufferSlot]:
        return iter(self._all())  # a copy: appends during iteration are not seen

    def get_slice(self, start: int = 0, end: int | None = None) -> list[BufferSlot]:
        """Slots [start:end] (paging / windowing)."""
        return self._all()[start:end]

    def get_by_type(self, payload_type: str) -> list[BufferSlot]:
        """Slots whose payload class is named `payload_type`."""
        return [s for s in self._all() if s.metadata.payload_type == payload_type]

    def get_from(self, from_id: str) -> list[BufferSlot]:
        """Slots sent by `from_id`."""
        return [s for s in self._all() if s.from_id == from_id]

    def __repr__(self) -> str:
        kind = "live" if self._buffer is not None else "snapshot"
        return f"ThreadContext({self.thread_id!r}, {kind})"
