"""BufferSlot and SlotMetadata: the immutable records of the Context Buffer (xml-pipeline's shape).

A slot is one validated payload in a thread's append-only log, plus who sent it to whom. Handlers
get the slot itself; `frozen=True` means they cannot change what other handlers will see.

`slot_index` is the slot's position in its thread's log. The backend assigns it atomically when the
slot is stored, so the serialized blob carries `UNASSIGNED` (-1) and ContextBuffer fills in the real
position on every slot it returns (see context_buffer.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: slot_index of a slot that has not been stored yet (and of the copy inside a stored blob).
UNASSIGNED = -1


@dataclass(frozen=True)
class SlotMetadata:
    """Immutable metadata of one buffer slot."""

    thread_id: str
    from_id: str
    to_id: str
    slot_index: int
    timestamp: str
    payload_type: str

    # Handler-facing metadata (what xml-pipeline hands to handlers as HandlerMetadata).
    own_name: str | None = None
    is_self_call: bool = False
    usage_instructions: str = ""


@dataclass(frozen=True)
class BufferSlot:
    """One immutable slot of the context buffer: the validated payload and its metadata."""

    payload: Any
    metadata: SlotMetadata

    @property
    def thread_id(self) -> str:
        return self.metadata.thread_id

    @property
    def from_id(self) -> str:
        return self.metadata.from_id

    @property
    def to_id(self) -> str:
        return self.metadata.to_id

    @property
    def index(self) -> int:
        return self.metadata.slot_index

    def at_index(self, index: int) -> "BufferSlot":
        """This slot with `metadata.slot_index == index` (self when it already is)."""
        if self.metadata.slot_index == index:
            return self
        # Every slot read back goes through here: copy the fields directly rather than through
        # dataclasses.replace (which re-runs the frozen __init__), ~10x cheaper per slot.
        meta = object.__new__(SlotMetadata)
        fields = meta.__dict__
        fields.update(self.metadata.__dict__)
        fields["slot_index"] = index
        slot = object.__new__(BufferSlot)
        slot.__dict__.update(payload=self.payload, metadata=meta)
        return slot
