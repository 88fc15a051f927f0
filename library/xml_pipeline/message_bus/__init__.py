"""xml_pipeline.message_bus: messages, the handler API and the routing state of an organism.

What a handler needs is exported here: it receives a `Message` and returns a `HandlerResult`
(None, an XML fragment as `str`/`bytes`, an `Element`, `Reply(payload)`, `Call(to, payload)` or a
list of them); `text_payload` builds a fragment from text, `check_fragment` validates one, and a
handler's bad input is a `MessageError`. `ThreadRegistry` / `get_registry` map opaque thread uuids
to call chains.

The machinery lives in modules of its own, imported by the pump and the CLI, not here:
`stream_pump` (the pump), `local_pool` / `worker_task` (cpu_bound work in local processes),
`streams` / `dispatcher` / `worker` / `ingress` / `retry` (distributed mode on Redis Streams).
"""
from __future__ import annotations

from .message import (
    Call,
    HandlerResult,
    Message,
    MessageError,
    Reply,
    check_fragment,
    text_payload,
)
from .thread_registry import ThreadRegistry, get_registry

__all__ = [
    "Call",
    "HandlerResult",
    "Message",
    "MessageError",
    "Reply",
    "ThreadRegistry",
    "check_fragment",
    "get_registry",
    "text_payload",
]
