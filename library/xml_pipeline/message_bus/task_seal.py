"""A worker pod's inputs and response inside the stream entries, signed (sealed) for their task.

A task for a worker pod carries its message in the tasks stream entry (field `input`), and the
worker's result carries the response (field `response`), so neither passes through the backend's
temp key space: a task costs the pump its append, its share of an XADD batch and its share of an
XREAD of results, and the worker one XREADGROUP and one result write — no temp-key round trips.

Anyone who can write to the tasks stream could put a task there, and a pod runs nothing its pump
did not send; so each value is an envelope signed with the organism's key ring (memory/signing.py)
and bound to a context that is not stored:
- an input to the namespace (the Redis prefix), the task id, the listener and the handler: copied
  into another task, or with its listener or handler changed, it no longer verifies;
- a response to the namespace and the task id: copied into another task's result, it no longer
  verifies.
The contexts are tagged, so neither can equal a slot's place or a temp value's context. The bodies
are JSON and text, never pickle: nothing a worker or the pump reads from a stream can run code.

    input     b"I" | metadata JSON | b"\n" | payload (UTF-8)      (compact JSON holds no newline)
    response  b"R" | the actions' JSON (what a local worker sends back over its pipe)

In the entry a sealed value is text: the envelope's binary head (version, key id, MAC) in base64,
b".", then the body as it is. So every field of a task entry stays UTF-8, which readers that decode
each field as text (redis-cli, a worker of an earlier release) can take.

A payload over INLINE_PAYLOAD_MAX is not copied into the entry: the metadata names the message's
slot ("index") and the worker reads the payload from there, after the slot verified at its place
and proved to be this message's (`payload_from_slot`). Such a payload crosses to the backend once.
"""
from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from ..errors import BackendError, SlotIntegrityError
from ..memory.protocol import SharedBackend
from ..memory.serialization import unpickle
from ..memory.signing import OVERHEAD, Signer
from ..memory.slots import BufferSlot
from .message import Message

__all__ = ["INLINE_PAYLOAD_MAX", "metadata_json", "namespace_of", "seal_input", "open_input", "seal_response",
           "open_response_body", "payload_from_slot"]

#: A payload larger than this is not copied into the task (or a temp key): the worker reads it from
#: the message's slot in the context buffer, which the pump stores anyway.
INLINE_PAYLOAD_MAX = 64 * 1024

_INPUT, _RESPONSE = b"I", b"R"
_INPUT_CONTEXT, _RESPONSE_CONTEXT = b"task-input\0", b"task-response\0"


def _context(tag: bytes, *parts: str) -> bytes:
    out = [tag]
    for part in parts:
        b = part.encode()
        out.append(len(b).to_bytes(4, "big"))
        out.append(b)
    return b"".join(out)


def _as_text(blob: bytes) -> bytes:
    """A signed envelope as entry text: base64 of its head, b".", its body."""
    start = OVERHEAD + blob[OVERHEAD - 1]  # the head ends after the append id
    return b"".join((base64.b64encode(blob[:start]), b".", blob[start:]))


def _from_text(text: bytes, what: str) -> bytes:
    """The signed envelope of entry text (SlotIntegrityError if it is not in that form)."""
    head, dot, body = text.partition(b".")
    try:
        if not dot:
            raise ValueError("no separator")
        return base64.b64decode(head, validate=True) + body
    except (ValueError, binascii.Error):
        raise SlotIntegrityError(f"{what} is not a sealed value") from None


def namespace_of(backend: SharedBackend) -> str:
    """The backend's namespace (its Redis prefix): what slots and sealed values are bound to."""
    return str(getattr(backend, "slot_namespace", ""))


def metadata_json(message: Message, chain: str | None = None, *, index: int | None = None) -> bytes:
    """The message's metadata as the worker rebuilds it (`index`: read the payload from that slot)."""
    meta: dict[str, Any] = {"from": message.sender, "to": message.to, "thread": message.thread, "type": message.kind,
                            "id": message.id, "in_reply_to": message.in_reply_to, "chain": chain}
    if index is not None:
        meta["index"] = index
    return json.dumps(meta, separators=(",", ":")).encode()


def seal_input(signer: Signer, namespace: str, task_id: str, listener: str, handler: str, message: Message,
               slot_index: int = -1) -> bytes:
    """The task's `input` field: the message, signed for this task. A payload over
    INLINE_PAYLOAD_MAX whose slot index is known is left in its slot."""
    payload = message.payload.encode("utf-8")
    if len(payload) > INLINE_PAYLOAD_MAX and slot_index >= 0:
        meta, payload = metadata_json(message, index=slot_index), b""
    else:
        meta = metadata_json(message)
    body = b"".join((_INPUT, meta, b"\n", payload))
    return _as_text(signer.sign(body, context=_context(_INPUT_CONTEXT, namespace, task_id, listener, handler)))


def open_input(backend: SharedBackend, task_id: str, listener: str, handler: str, blob: bytes) -> Message:
    """Worker side: the message a sealed input holds, after it verified for this task
    (SlotIntegrityError otherwise; LookupError when the slot it names is gone)."""
    namespace = namespace_of(backend)
    body = backend.signer.verify(_from_text(blob, f"the input of task {task_id}"),
                                 context=_context(_INPUT_CONTEXT, namespace, task_id, listener, handler))
    end = body.find(b"\n")
    if body[:1] != _INPUT or end < 0:
        raise SlotIntegrityError(f"the input of task {task_id} holds a different kind of value")
    meta = json.loads(body[1:end])
    if not isinstance(meta, dict):
        raise SlotIntegrityError(f"the input of task {task_id} holds malformed metadata")
    index = meta.get("index")
    if index is None:
        payload = body[end + 1:].decode("utf-8")
    else:
        payload = payload_from_slot(backend, {"thread": meta.get("thread"), "index": index, "id": meta.get("id")},
                                    meta, f"of task {task_id}")
    return Message(sender=meta["from"], to=meta["to"], payload=payload, thread=meta.get("thread"),
                   kind=meta.get("type", "request"), id=meta["id"], in_reply_to=meta.get("in_reply_to"))


def seal_response(signer: Signer, namespace: str, task_id: str, actions_json: bytes) -> bytes:
    """The result's `response` field: the actions' JSON, signed for this task."""
    return _as_text(signer.sign(_RESPONSE + actions_json, context=_context(_RESPONSE_CONTEXT, namespace, task_id)))


def open_response_body(signer: Signer, namespace: str, task_id: str, blob: bytes) -> bytes:
    """Pump side: the actions' JSON of a sealed response, after it verified for this task."""
    body = signer.verify(_from_text(blob, f"the response to task {task_id}"),
                         context=_context(_RESPONSE_CONTEXT, namespace, task_id))
    if body[:1] != _RESPONSE:
        raise SlotIntegrityError(f"the response to task {task_id} holds a different kind of value")
    return body[1:]


def payload_from_slot(backend: SharedBackend, ref: Any, meta: dict[str, Any], what: str) -> str:
    """The payload of the message whose slot `ref` ({thread, index, id}) names, after the slot
    verified at its place (prefix, thread, index) and proved to be this message's (its append id is
    the message id). `what` names the reference in errors."""
    if not isinstance(ref, dict):
        raise SlotIntegrityError(f"payload {what} holds a malformed slot reference")
    thread, index, ident = ref.get("thread"), ref.get("index"), meta.get("id")
    if thread != meta.get("thread") or ref.get("id") != ident or type(index) is not int or not isinstance(thread, str):
        raise SlotIntegrityError(f"payload {what} refers to a slot of another message")
    blob = backend.buffer_get_slot(thread, index)
    if blob is None:
        raise LookupError(f"the slot holding payload {what} (thread {thread}, index {index}) is gone "
                          "(expired or deleted)")
    place = backend.signer.place(namespace_of(backend), thread)
    try:
        append_id, pickled = place.open(blob, index, view=True)  # a large payload: no copy before unpickling
    except SlotIntegrityError as e:
        raise SlotIntegrityError(f"thread {thread!r} slot {index} (payload {what}): {e}") from None
    if append_id != str(ident).encode():
        raise SlotIntegrityError(f"thread {thread!r} slot {index} holds another message than payload {what} names")
    slot = unpickle(pickled)
    message = getattr(slot, "payload", None)
    if not isinstance(slot, BufferSlot) or not isinstance(message, Message) or message.id != ident:
        raise BackendError(f"thread {thread!r} slot {index} does not hold message {ident} (payload {what})")
    return message.payload
