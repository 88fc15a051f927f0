"""BufferSlot and SlotMetadata: the immutable records of the Context Buffer (xml-pipeline's shape).

A slot is one validated payload in a thread's append-only log, plus who sent it to whom. Handlers
get the slot itself; `frozen=True` means they cannot change what other handlers will see.

`slot_index` is the slot's position in its thread's log. The backend assigns it atomically when the
slot is stored, so the serialized blob carries `UNASSIGNED` (-1) and ContextBuffer fills in the real
position on every slot it returns (see context_buffer.py).
"""
from __future__ import annotations

import copyreg
from dataclasses import dataclass
from typing import Any

#: What pickle's default form of a class instance unpickles through (subclasses keep that form).
_NEWOBJ = copyreg.__newobj__  # type: ignore[attr-defined]
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

    def __reduce__(self) -> tuple[Any, ...]:
        if type(self) is not SlotMetadata:  # a subclass keeps the default form (and its type)
            return (_NEWOBJ, (type(self),), self.__dict__)
        return (_metadata, (self.thread_id, self.from_id, self.to_id, self.slot_index, self.timestamp,
                            self.payload_type, self.own_name, self.is_self_call, self.usage_instructions))


@dataclass(frozen=True)
class BufferSlot:
    """One immutable slot of the context buffer: the validated payload and its metadata."""

    payload: Any
    metadata: SlotMetadata

    def __reduce__(self) -> tuple[Any, ...]:
        # Still a pickle of a BufferSlot, but as one call with a flat tuple: the dataclass default
        # (copyreg.__newobj__ and a state dict, per dataclass) costs ~3x more to pickle and to
        # unpickle, and every append pickles one and every read unpickles them all. Blobs pickled
        # the default way still load (the classes' layout is unchanged).
        m = self.metadata
        if type(self) is not BufferSlot or type(m) is not SlotMetadata:  # subclasses: the default form
            return (_NEWOBJ, (type(self),), self.__dict__)
        return (_slot, (self.payload, m.thread_id, m.from_id, m.to_id, m.slot_index, m.timestamp, m.payload_type,
                        m.own_name, m.is_self_call, m.usage_instructions))

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


def _metadata(thread_id: str, from_id: str, to_id: str, slot_index: int, timestamp: str, payload_type: str,
              own_name: str | None, is_self_call: bool, usage_instructions: str) -> SlotMetadata:
    """A SlotMetadata without the frozen dataclass __init__ (one object.__setattr__ per field)."""
    meta = _new(SlotMetadata)
    meta.__dict__.update({"thread_id": thread_id, "from_id": from_id, "to_id": to_id, "slot_index": slot_index,
                          "timestamp": timestamp, "payload_type": payload_type, "own_name": own_name,
                          "is_self_call": is_self_call, "usage_instructions": usage_instructions})
    return meta


def _slot(payload: Any, thread_id: str, from_id: str, to_id: str, slot_index: int, timestamp: str,
          payload_type: str, own_name: str | None, is_self_call: bool, usage_instructions: str) -> BufferSlot:
    """A BufferSlot and its SlotMetadata from their fields (what a BufferSlot pickles to). Every
    slot of every read is built here: a dict display and one update each, no keyword arguments."""
    meta = _new(SlotMetadata)
    meta.__dict__.update({"thread_id": thread_id, "from_id": from_id, "to_id": to_id, "slot_index": slot_index,
                          "timestamp": timestamp, "payload_type": payload_type, "own_name": own_name,
                          "is_self_call": is_self_call, "usage_instructions": usage_instructions})
    slot = _new(BufferSlot)
    fields = slot.__dict__
    fields["payload"] = payload
    fields["metadata"] = meta
    return slot


_new = object.__new__

#: For ContextBuffer: build a slot from trusted fields (the pickled form's constructor).
make_slot = _slot
