"""The worker data flow (spec: "Worker Data Flow"): what crosses between the pump and a worker.

The pump appends the message to the context buffer (a signed slot), then hands the worker a
WorkerTask carrying the message, and the worker's WorkerResult carries the response back:
- a local pool's worker is a child of the pump reached over a pipe of its own that nobody else can
  read or write: the task carries the message itself and the result the response's JSON
  (`WorkerTask.message`, `WorkerResult.response`);
- a worker pod is reached through a Redis Stream anyone with write access to it could add to: the
  task entry carries the message sealed for the task (`sealed_input`) and the result entry the
  response sealed for it (`sealed_response`), both signed with the organism's key ring
  (task_seal.py). The dispatcher seals and opens them, so the pump handles both alike.

The temp-key form is the one the spec draws, and what a worker still answers for a task that
arrives in it (from a pump of an earlier release, or a caller of store_inputs):

    pump    store payload + metadata in the backend's temp key space (signed), submit a WorkerTask
    worker  fetch + verify both, run the handler, store the response (signed) under a response uuid,
            return a WorkerResult naming it
    pump    fetch + verify the response, delete the three temp keys, route the response on

Every temp value is an envelope signed with the backend's key ring, with a one-byte domain tag
inside (payload, metadata, response), so a value can neither be forged nor swapped for another kind
of value. Metadata and responses are JSON, not pickle: nothing a worker reads can run code.
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
from ..organism import resolve_handler
from .message import Action, Message, MessageError, actions_from_json, actions_to_json, normalize_result
from .task_seal import INLINE_PAYLOAD_MAX as INLINE_PAYLOAD_MAX  # re-exported: the data flow's size limit
from .task_seal import metadata_json, namespace_of, open_input, payload_from_slot, seal_response

log = logging.getLogger(__name__)

_PAYLOAD, _META, _RESPONSE, _SLOT_REF = b"P", b"M", b"R", b"S"

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
    """One cpu_bound handler call: the handler reference and the message — itself over a local
    worker's pipe (`message`), sealed in a stream entry (`sealed_input`), or (the temp-key form)
    the ids of its temp values (`payload_key`, `metadata_key`)."""

    task_id: str
    listener: str
    handler: str  # "package.module:function"
    payload_key: str
    metadata_key: str
    #: Distributed mode: the results stream of the pump that submitted the task.
    reply_to: str = ""
    #: Distributed mode: failed attempts so far (handler errors; deaths are counted by Redis).
    failures: int = 0
    #: The message (the pump's side; over a local worker's own pipe as it is). Never part of a
    #: stream entry: the dispatcher seals it into `sealed_input`.
    message: Message | None = None
    #: Where the message's slot landed in its thread (-1: unknown): a sealed input leaves a large
    #: payload there instead of copying it (task_seal.py).
    slot_index: int = -1
    #: A worker pod's task: the message signed for this task (task_seal.seal_input).
    sealed_input: bytes = b""

    def __reduce__(self) -> tuple[Any, ...]:
        # A plain tuple through the pipe to a local worker: the dataclass default (getstate /
        # setstate over fields()) costs ~10x more per task.
        return (WorkerTask, (self.task_id, self.listener, self.handler, self.payload_key, self.metadata_key,
                             self.reply_to, self.failures, self.message, self.slot_index, self.sealed_input))

    def to_fields(self) -> dict[str, str | bytes]:
        """The task as a Redis Stream entry (field by field, not dataclasses.asdict: that deep-copies).
        A sealed task keeps empty temp-key fields: a worker of an earlier release that takes it
        answers at once with a MissingData error instead of dropping it as malformed."""
        if self.message is not None:
            raise ValueError(f"task {self.task_id} carries its message unsealed: it goes over a local worker's "
                             "pipe, or is sealed by the dispatcher before it goes into a stream")
        fields: dict[str, str | bytes] = {
            "task_id": self.task_id, "listener": self.listener, "handler": self.handler,
            "payload_key": self.payload_key, "metadata_key": self.metadata_key, "reply_to": self.reply_to,
            "failures": str(self.failures)}
        if self.sealed_input:
            fields["input"] = self.sealed_input
        return fields

    @classmethod
    def from_fields(cls, fields: dict[bytes | str, bytes | str]) -> "WorkerTask":
        try:
            s, sealed = _entry_fields(fields, "input", "strict")
            return cls(task_id=s["task_id"], listener=s["listener"], handler=s["handler"],
                       payload_key=s.get("payload_key", ""), metadata_key=s.get("metadata_key", ""),
                       reply_to=s.get("reply_to", ""), failures=int(s.get("failures", "0")),
                       sealed_input=sealed)
        except (KeyError, ValueError) as e:  # UnicodeDecodeError is a ValueError
            raise ValueError(f"malformed task entry: {e}") from None

    def with_failures(self, failures: int) -> "WorkerTask":
        """This task, to queue again after `failures` failed attempts."""
        return WorkerTask(self.task_id, self.listener, self.handler, self.payload_key, self.metadata_key,
                          reply_to=self.reply_to, failures=failures, sealed_input=self.sealed_input)


@dataclass(frozen=True, slots=True)
class WorkerResult:
    """What a worker reports: the key of its stored response, or why there is none."""

    task_id: str
    response_key: str | None = None
    error: str | None = None
    error_type: str | None = None
    worker: str = ""
    #: The answer to a task that carried its message: the response's JSON body (over a local
    #: worker's pipe; from a worker pod once the dispatcher opened `sealed_response`). Never part of
    #: a stream entry.
    response: bytes | None = None
    #: A worker pod's answer to a sealed task: the response signed for the task
    #: (task_seal.seal_response), in the result entry.
    sealed_response: bytes = b""

    @property
    def ok(self) -> bool:
        return self.error is None

    def __reduce__(self) -> tuple[Any, ...]:
        return (WorkerResult, (self.task_id, self.response_key, self.error, self.error_type, self.worker,
                               self.response, self.sealed_response))

    def to_fields(self) -> dict[str, str | bytes]:
        """The result as a Redis Stream entry ("" for None)."""
        if self.response is not None:
            raise ValueError(f"the result of task {self.task_id} carries its response unsealed: it goes over a "
                             "local worker's pipe, not into a stream")
        fields: dict[str, str | bytes] = {
            "task_id": self.task_id, "response_key": self.response_key or "", "error": self.error or "",
            "error_type": self.error_type or "", "worker": self.worker}
        if self.sealed_response:
            fields["response"] = self.sealed_response
        return fields

    @classmethod
    def from_fields(cls, fields: dict[bytes | str, bytes | str]) -> "WorkerResult":
        s, sealed = _entry_fields(fields, "response", "replace")
        return cls(task_id=s.get("task_id", ""), response_key=s.get("response_key") or None,
                   error=s.get("error") or None, error_type=s.get("error_type") or None,
                   worker=s.get("worker", ""), sealed_response=sealed)


def _entry_fields(fields: dict[bytes | str, bytes | str], sealed: str, errors: str) -> tuple[dict[str, str], bytes]:
    """A stream entry's fields as text, and its sealed field (`sealed`, b"" if none) as bytes.
    `errors`: how bytes that are not UTF-8 decode ("strict" raises UnicodeDecodeError)."""
    text: dict[str, str] = {}
    value: bytes = b""
    for k, v in fields.items():
        name = k.decode(errors=errors) if isinstance(k, bytes) else k
        if name == sealed:
            value = v.encode() if isinstance(v, str) else v
        else:
            text[name] = v.decode(errors=errors) if isinstance(v, bytes) else v
    return text, value


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
                                         (metadata_key, _META, metadata_json(message, chain))]


def store_inputs(backend: SharedBackend, message: Message, *, chain: str | None = None) -> tuple[str, str]:
    """Pump side, step 1: store payload and metadata; return (payload_key, metadata_key)."""
    keys, items = input_values(message, chain=chain)
    _put_many(backend, items)
    return keys


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
        payload = payload_from_slot(backend, json.loads(body[1:]), meta, task.payload_key)
    else:
        raise SlotIntegrityError(f"payload {task.payload_key} holds a different kind of value")
    return Message(sender=meta["from"], to=meta["to"], payload=payload, thread=meta.get("thread"),
                   kind=meta.get("type", "request"), id=meta["id"], in_reply_to=meta.get("in_reply_to"))


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
    """Worker side, step 2 without the final write: take the message (carried, sealed, or fetched
    and verified from its temp keys), run the handler, and answer the way the message came (over
    the pipe, sealed in the result, or signed for a temp key). Never raises for a task's fault (the
    result says what went wrong)."""
    def fail(error: str, error_type: str) -> Outcome:
        return Outcome(WorkerResult(task.task_id, error=error, error_type=error_type, worker=worker))

    try:
        if task.message is not None:
            message = task.message
        elif task.sealed_input:
            message = open_input(backend, task.task_id, task.listener, task.handler, task.sealed_input)
        else:
            message = load_inputs(backend, task)
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
    if task.sealed_input:  # in the result entry, sealed for the task
        body = json.dumps(actions_to_json(actions), separators=(",", ":")).encode()
        sealed = seal_response(backend.signer, namespace_of(backend), task.task_id, body)
        return Outcome(WorkerResult(task.task_id, worker=worker, sealed_response=sealed))
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
