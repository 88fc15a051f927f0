"""The worker data flow (spec: "Worker Data Flow"): what crosses between the pump and a worker.

    pump    store payload + metadata in the backend's temp key space (signed), submit a WorkerTask
    worker  fetch + verify both, run the handler, store the response (signed) under a response uuid,
            return a WorkerResult naming it
    pump    fetch + verify the response, delete the three temp keys, route the response on

A WorkerTask sent through the backend (a Redis Stream entry to a worker pod) carries only ids and
the handler reference, so it is tiny whatever the payload size. A local pool's worker is a child of
the pump reached over a pipe of its own that nobody else can read or write: there the task carries
the message itself and the result the response (`WorkerTask.message`, `WorkerResult.response`),
which saves the three temp-key round trips (the worker's fetch and store, the pump's take); the
message's signed slot is appended to the context buffer either way. Every temp value is
an envelope signed with the backend's key ring, with a one-byte domain tag inside (payload,
metadata, response), so a value can neither be forged nor swapped for another kind of value. The
metadata and the response are JSON, not pickle: nothing a worker reads can run code.
"""
from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
import threading
import traceback
from dataclasses import dataclass
from typing import Any

from ..errors import BackendError, SlotIntegrityError
from ..memory.protocol import SharedBackend
from ..memory.serialization import unpickle
from ..memory.slots import BufferSlot
from ..organism import resolve_handler
from .message import Action, Message, MessageError, actions_from_json, actions_to_json, normalize_result

log = logging.getLogger(__name__)

_PAYLOAD, _META, _RESPONSE, _SLOT_REF = b"P", b"M", b"R", b"S"
#: A payload larger than this is not copied into its temp key: the payload value is a reference to
#: the message's slot in the context buffer (stored in the same round trip anyway), and the worker
#: reads the payload from there. Such a payload then crosses to the backend once, is signed once
#: (the slot's signature, bound to its prefix, thread and index) and read once; below this, a copy
#: saves the worker's second round trip.
INLINE_PAYLOAD_MAX = 64 * 1024

#: error_type values of a WorkerResult
HANDLER_ERROR = "HandlerError"
WORKER_DIED = "WorkerDied"
INTEGRITY_ERROR = "IntegrityError"
MISSING_DATA = "MissingData"
DEAD_LETTER = "DeadLetter"
BACKEND_ERROR = "BackendError"
#: The pump got no result within process_pool.task_deadline (the task was lost, or ran too long).
TASK_DEADLINE = "TaskDeadline"


class _RandomPool:
    """Random bytes for keys, read from os.urandom 4 KiB at a time instead of 16 bytes per key (a
    syscall per key shows in every round trip). Same source, same randomness; refilled in a forked
    child so parent and child never hand out the same bytes."""

    _SIZE = 4096

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Start empty; runs again in a forked child (see register_at_fork below)."""
        self._lock = threading.Lock()  # a new one in a forked child too: another thread may hold it
        self._buf = b""
        self._pos = 0

    def take16(self) -> bytes:
        with self._lock:
            pos = self._pos
            if pos + 16 > len(self._buf):
                self._buf, pos = os.urandom(self._SIZE), 0
            self._pos = pos + 16
            return self._buf[pos:pos + 16]


_random = _RandomPool()
os.register_at_fork(after_in_child=_random.reset)


def new_key() -> str:
    """A random uuid4, as 32 hex digits (what uuid.uuid4().hex returns)."""
    b = bytearray(_random.take16())
    b[6] = (b[6] & 0x0F) | 0x40  # version 4
    b[8] = (b[8] & 0x3F) | 0x80  # RFC 4122 variant
    return b.hex()


@dataclass(frozen=True, slots=True)
class WorkerTask:
    """One cpu_bound handler call: ids and a handler reference; the message itself only over a
    local worker's own pipe (`message`), never through the backend."""

    task_id: str
    listener: str
    handler: str  # "package.module:function"
    payload_key: str
    metadata_key: str
    #: Distributed mode: the results stream of the pump that submitted the task.
    reply_to: str = ""
    #: Distributed mode: failed attempts so far (handler errors; deaths are counted by Redis).
    failures: int = 0
    #: Local pool: the message, over the worker's own pipe (no temp keys: payload_key and
    #: metadata_key are empty). Never part of a stream entry.
    message: Message | None = None

    def __reduce__(self) -> tuple[Any, ...]:
        # A plain tuple through the pipe to a local worker: the dataclass default (getstate /
        # setstate over fields()) costs ~10x more per task.
        return (WorkerTask, (self.task_id, self.listener, self.handler, self.payload_key, self.metadata_key,
                             self.reply_to, self.failures, self.message))

    def to_fields(self) -> dict[str, str]:
        """The task as a Redis Stream entry (field by field, not dataclasses.asdict: that deep-copies)."""
        if self.message is not None:
            raise ValueError(f"task {self.task_id} carries its message: it goes over a local worker's pipe, "
                             "not into a stream")
        return {"task_id": self.task_id, "listener": self.listener, "handler": self.handler,
                "payload_key": self.payload_key, "metadata_key": self.metadata_key, "reply_to": self.reply_to,
                "failures": str(self.failures)}

    @classmethod
    def from_fields(cls, fields: dict[bytes | str, bytes | str]) -> "WorkerTask":
        d = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
             for k, v in fields.items()}
        try:
            return cls(task_id=d["task_id"], listener=d["listener"], handler=d["handler"],
                       payload_key=d["payload_key"], metadata_key=d["metadata_key"],
                       reply_to=d.get("reply_to", ""), failures=int(d.get("failures", "0")))
        except (KeyError, ValueError) as e:
            raise ValueError(f"malformed task entry: {e}") from None


@dataclass(frozen=True, slots=True)
class WorkerResult:
    """What a worker reports: the key of its stored response, or why there is none."""

    task_id: str
    response_key: str | None = None
    error: str | None = None
    error_type: str | None = None
    worker: str = ""
    #: The answer to a task that carried its message (local pool): the response's JSON body, over
    #: the worker's own pipe instead of under response_key. Never part of a stream entry.
    response: bytes | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def __reduce__(self) -> tuple[Any, ...]:
        return (WorkerResult, (self.task_id, self.response_key, self.error, self.error_type, self.worker,
                               self.response))

    def to_fields(self) -> dict[str, str]:
        """The result as a Redis Stream entry ("" for None)."""
        if self.response is not None:
            raise ValueError(f"the result of task {self.task_id} carries its response: it goes over a local "
                             "worker's pipe, not into a stream")
        return {"task_id": self.task_id, "response_key": self.response_key or "", "error": self.error or "",
                "error_type": self.error_type or "", "worker": self.worker}

    @classmethod
    def from_fields(cls, fields: dict[bytes | str, bytes | str]) -> "WorkerResult":
        d = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
             for k, v in fields.items()}
        return cls(task_id=d.get("task_id", ""), response_key=d.get("response_key") or None,
                   error=d.get("error") or None, error_type=d.get("error_type") or None,
                   worker=d.get("worker", ""))


# -- temp values --------------------------------------------------------------------------------------
# The data flow uses the SharedBackend's batches (temp_put_many, temp_get_many, temp_take,
# buffer_append_at with items: the one-key operations, one round trip each).
#: Lifetime of temp values without a configured TTL (the backends' own default: 24 h).
_DEFAULT_TEMP_TTL = 86400


def _signed(backend: SharedBackend, items: list[tuple[str, bytes, bytes]]) -> list[tuple[str, bytes]]:
    """(key, tag, body) → (key, signed envelope of tag + body)."""
    sign = backend.signer.sign
    return [(k, sign(tag + body)) for k, tag, body in items]


def _put_many(backend: SharedBackend, items: list[tuple[str, bytes, bytes]]) -> None:
    """Store (key, tag, body) values, each in a signed envelope."""
    backend.temp_put_many(_signed(backend, items))


def _open(backend: SharedBackend, blob: bytes | None, key: str, tag: bytes, what: str) -> bytes:
    if blob is None:
        raise LookupError(f"{what} {key} is gone (expired or already consumed)")
    body = backend.signer.verify(blob)  # SlotIntegrityError before anything is decoded
    if body[:1] != tag:
        raise SlotIntegrityError(f"{what} {key} holds a different kind of value")
    return body[1:]


def _get_many(backend: SharedBackend, keys: list[str]) -> list[bytes | None]:
    return list(backend.temp_get_many(keys))


def input_values(message: Message, *, chain: str | None = None) -> tuple[tuple[str, str], list[tuple[str, bytes, bytes]]]:
    """Pump side, step 1 without the write: the new (payload_key, metadata_key) and the
    (key, tag, body) values to store under them."""
    payload_key, metadata_key = new_key(), new_key()
    return (payload_key, metadata_key), [(payload_key, _PAYLOAD, message.payload.encode("utf-8")),
                                         (metadata_key, _META, _metadata(message, chain))]


def _metadata(message: Message, chain: str | None) -> bytes:
    meta = {"from": message.sender, "to": message.to, "thread": message.thread, "type": message.kind,
            "id": message.id, "in_reply_to": message.in_reply_to, "chain": chain}
    return json.dumps(meta, separators=(",", ":")).encode()


def signed_inputs(backend: SharedBackend, message: Message, *,
                  chain: str | None = None) -> tuple[tuple[str, str], list[tuple[str, bytes]]]:
    """input_values(), signed with the backend's key ring: ((payload_key, metadata_key), [(key, blob)])."""
    keys, items = input_values(message, chain=chain)
    return keys, _signed(backend, items)


def store_inputs(backend: SharedBackend, message: Message, *, chain: str | None = None) -> tuple[str, str]:
    """Pump side, step 1: store payload and metadata; return (payload_key, metadata_key)."""
    keys, items = input_values(message, chain=chain)
    _put_many(backend, items)
    return keys


class WorkerInputs:
    """The worker's inputs of one message, to store with the message's append: the temp keys, and
    `items(index)`, the signed values for the slot signed for `index` (the same values whatever the
    index, unless the payload is a reference to that slot)."""

    __slots__ = ("keys", "_backend", "_message", "_meta", "_inline")

    def __init__(self, backend: SharedBackend, message: Message, *, chain: str | None = None) -> None:
        self._backend = backend
        self._message = message
        if len(message.payload) <= INLINE_PAYLOAD_MAX:
            self.keys, values = input_values(message, chain=chain)
            self._inline: list[tuple[str, bytes]] | None = _signed(backend, values)
        else:
            self.keys = (new_key(), new_key())
            self._inline = None
            self._meta = (self.keys[1], _META, _metadata(message, chain))

    @property
    def by_reference(self) -> bool:
        """True when the payload is read from the message's slot, not from a copy."""
        return self._inline is None

    def items(self, index: int) -> list[tuple[str, bytes]]:
        if self._inline is not None:
            return self._inline
        m = self._message
        ref = json.dumps({"thread": m.thread, "index": index, "id": m.id}, separators=(",", ":")).encode()
        return _signed(self._backend, [(self.keys[0], _SLOT_REF, ref), self._meta])


def worker_inputs(backend: SharedBackend, message: Message, *, chain: str | None = None) -> WorkerInputs:
    """Pump side, step 1 without the write: the worker's inputs of `message`, for
    ContextBuffer.append_and_put(..., temps=inputs.items) (one round trip with the append)."""
    return WorkerInputs(backend, message, chain=chain)


def load_inputs(backend: SharedBackend, task: WorkerTask) -> Message:
    """Worker side: fetch and verify payload + metadata, rebuild the message."""
    blobs = _get_many(backend, [task.payload_key, task.metadata_key])
    meta = json.loads(_open(backend, blobs[1], task.metadata_key, _META, "metadata"))
    if blobs[0] is None:
        raise LookupError(f"payload {task.payload_key} is gone (expired or already consumed)")
    body = backend.signer.verify(blobs[0])
    tag = body[:1]
    if tag == _PAYLOAD:
        payload = body[1:].decode("utf-8")
    elif tag == _SLOT_REF:
        payload = _payload_from_slot(backend, json.loads(body[1:]), meta, task.payload_key)
    else:
        raise SlotIntegrityError(f"payload {task.payload_key} holds a different kind of value")
    return Message(sender=meta["from"], to=meta["to"], payload=payload, thread=meta.get("thread"),
                   kind=meta.get("type", "request"), id=meta["id"], in_reply_to=meta.get("in_reply_to"))


def _payload_from_slot(backend: SharedBackend, ref: Any, meta: dict[str, Any], key: str) -> str:
    """The payload of the message whose slot `ref` names, after the slot verified at its place
    (prefix, thread, index) and proved to be this message's (its append id is the message id)."""
    if not isinstance(ref, dict):
        raise SlotIntegrityError(f"payload {key} holds a malformed slot reference")
    thread, index, ident = ref.get("thread"), ref.get("index"), meta.get("id")
    if thread != meta.get("thread") or ref.get("id") != ident or type(index) is not int or not isinstance(thread, str):
        raise SlotIntegrityError(f"payload {key} refers to a slot of another message")
    blob = backend.buffer_get_slot(thread, index)
    if blob is None:
        raise LookupError(f"the slot holding payload {key} (thread {thread}, index {index}) is gone "
                          "(expired or deleted)")
    place = backend.signer.place(getattr(backend, "slot_namespace", ""), thread)
    try:
        append_id, pickled = place.open(blob, index, view=True)  # a large payload: no copy before unpickling
    except SlotIntegrityError as e:
        raise SlotIntegrityError(f"thread {thread!r} slot {index} (payload {key}): {e}") from None
    if append_id != str(ident).encode():
        raise SlotIntegrityError(f"thread {thread!r} slot {index} holds another message than payload {key} names")
    slot = unpickle(pickled)
    message = getattr(slot, "payload", None)
    if not isinstance(slot, BufferSlot) or not isinstance(message, Message) or message.id != ident:
        raise BackendError(f"thread {thread!r} slot {index} does not hold message {ident} (payload {key})")
    return message.payload


def response_value(actions: list[Action]) -> tuple[str, bytes, bytes]:
    """Worker side, step 2's output: a new response key and the (key, tag, body) value to store there."""
    return new_key(), _RESPONSE, json.dumps(actions_to_json(actions), separators=(",", ":")).encode()


def take_response(backend: SharedBackend, key: str, also_delete: list[str]) -> list[Action]:
    """Pump side, step 3: fetch and verify the response, and delete it and `also_delete`.

    The keys are deleted whether or not the response verifies (one round trip where the backend
    has temp_take).
    """
    return open_response(backend, backend.temp_take(key, *also_delete), key)


def open_response(backend: SharedBackend, blob: bytes | None, key: str) -> list[Action]:
    """Pump side, step 3 after the fetch: verify the response stored under `key` and decode it."""
    return actions_from_json(json.loads(_open(backend, blob, key, _RESPONSE, "response")))


def carried_response(body: bytes) -> list[Action]:
    """Pump side, step 3 of a task that carried its message: decode the response a local worker sent
    back over its own pipe (the same JSON and checks as a stored response, without a signature:
    nothing but that worker writes to the pipe)."""
    return actions_from_json(json.loads(body))


def call_handler(func: Any, message: Message) -> list[Action]:
    """Run a handler (sync or async) and normalize what it returned."""
    result = func(message)
    if inspect.isawaitable(result):
        result = asyncio.run(_await(result))
    return normalize_result(result)


async def _await(aw: Any) -> Any:
    return await aw


@dataclass(frozen=True, slots=True)
class Outcome:
    """What running a task produced: the result, and the signed response not stored yet."""

    result: WorkerResult
    #: (response key, signed blob) to store under the temp key space; None after a failure.
    response: tuple[str, bytes] | None = None


def run_task(backend: SharedBackend, task: WorkerTask, *, worker: str = "") -> Outcome:
    """Worker side, step 2 without the final write: fetch + verify the inputs, run the handler,
    sign the response. Never raises for a task's fault (the result says what went wrong)."""
    def fail(error: str, error_type: str) -> Outcome:
        return Outcome(WorkerResult(task.task_id, error=error, error_type=error_type, worker=worker))

    try:
        message = task.message if task.message is not None else load_inputs(backend, task)
    except SlotIntegrityError as e:
        log.error("task %s (%s): input failed its integrity check: %s", task.task_id, task.listener, e)
        return fail(f"SlotIntegrityError: {e}", INTEGRITY_ERROR)
    except BackendError as e:
        log.error("task %s (%s): cannot fetch its input: %s", task.task_id, task.listener, e)
        return fail(f"{type(e).__name__}: {e}", BACKEND_ERROR)
    except (LookupError, ValueError, KeyError, MessageError) as e:
        log.error("task %s (%s): cannot load its input: %s", task.task_id, task.listener, e)
        return fail(f"{type(e).__name__}: {e}", MISSING_DATA)
    try:
        func = resolve_handler(task.handler)
        actions = call_handler(func, message)
    except Exception as e:  # noqa: BLE001 - a handler's failure becomes an error response
        # One line at ERROR (what failed, where); the traceback at DEBUG (-vv).
        log.error("listener %s (handler %s) raised on thread %s: %s: %s", task.listener, task.handler,
                  message.thread, type(e).__name__, e)
        log.debug("traceback of the failure above:\n%s", traceback.format_exc().rstrip())
        return fail(f"{type(e).__name__}: {e}", HANDLER_ERROR)
    if task.message is not None:  # the answer goes back the way the message came: over the pipe
        body = json.dumps(actions_to_json(actions), separators=(",", ":")).encode()
        return Outcome(WorkerResult(task.task_id, worker=worker, response=body))
    ((key, blob),) = _signed(backend, [response_value(actions)])
    return Outcome(WorkerResult(task.task_id, response_key=key, worker=worker), (key, blob))


def response_ttl(backend: SharedBackend) -> int:
    """TTL of a temp value on this backend (its configured TTL, else the 24 h default)."""
    return int(backend.config.ttl or _DEFAULT_TEMP_TTL)


def execute_task(backend: SharedBackend, task: WorkerTask, *, worker: str = "") -> WorkerResult:
    """Worker side, step 2: everything a worker does for one task. Never raises for a task's fault."""
    outcome = run_task(backend, task, worker=worker)
    if outcome.response is None:
        return outcome.result
    key, blob = outcome.response
    try:
        backend.temp_put_many([(key, blob)])  # on Redis: the raw write, not redis-py's SET
    except BackendError as e:
        log.error("task %s: cannot store the response: %s", task.task_id, e)
        return WorkerResult(task.task_id, error=f"{type(e).__name__}: {e}", error_type=BACKEND_ERROR, worker=worker)
    return outcome.result
