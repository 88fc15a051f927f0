"""HandlerMetadata and slot_to_handler_metadata: the handler-facing view of a buffer slot.

xml-pipeline hands every handler a HandlerMetadata (thread, sender, its own name, whether it called
itself, the usage instructions of its peers) derived from the slot its message was stored in.
"""
from __future__ import annotations

from dataclasses import dataclass

from .slots import BufferSlot


@dataclass
class HandlerMetadata:
    """Trustworthy context for a handler: taken from the stored slot, never from the payload."""

    thread_id: str
    from_id: str
    own_name: str | None = None
    is_self_call: bool = False
    usage_instructions: str = ""


def slot_to_handler_metadata(slot: BufferSlot) -> HandlerMetadata:
    """The HandlerMetadata of the message stored in `slot`."""
    meta = slot.metadata
    return HandlerMetadata(
        thread_id=meta.thread_id,
        from_id=meta.from_id,
        own_name=meta.own_name,
        is_self_call=meta.is_self_call,
        usage_instructions=meta.usage_instructions,
    )
