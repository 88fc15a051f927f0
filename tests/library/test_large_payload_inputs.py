"""A payload over INLINE_PAYLOAD_MAX is not copied into the worker's payload temp key: that key holds
a signed reference to the message's slot, and the worker reads the payload from the slot after it
verified at its place. It travels and is signed once, and every integrity guarantee holds: a
tampered slot, a reference to another message's slot, a forged reference and a gone slot all end in
an error result, and no handler runs on them."""
from __future__ import annotations

from collections.abc import Callable

import pytest
import redis

from xml_pipeline.errors import SlotIntegrityError
from xml_pipeline.memory import ContextBuffer, SharedBackend
from xml_pipeline.memory.signing import Signer
from xml_pipeline.message_bus.message import Message
from xml_pipeline.message_bus.worker_task import (
    INLINE_PAYLOAD_MAX,
    INTEGRITY_ERROR,
    MISSING_DATA,
    WorkerTask,
    execute_task,
    load_inputs,
    worker_inputs,
)

MakeBackend = Callable[..., SharedBackend]
BIG = "<big>" + "x" * (INLINE_PAYLOAD_MAX + 1000) + "</big>"
HANDLER = "xml_pipeline.examples.cpu:burn"


def _submit(backend: SharedBackend, buffer: ContextBuffer, payload: str, thread: str = "t1") -> tuple[Message, WorkerTask, int]:
    """What the pump does for a cpu_bound message: append it with the worker's inputs, make the task."""
    msg = Message("console", "work", payload, thread=thread)
    inputs = worker_inputs(backend, msg)
    slot = buffer.append_and_put(thread, msg, msg.sender, msg.to, own_name=msg.to, append_id=msg.id,
                                 temps=inputs.items)
    pk, mk = inputs.keys
    return msg, WorkerTask(f"task-{msg.id}", "work", HANDLER, pk, mk), slot.index


@pytest.mark.parametrize("kind", ["memory", "manager", "redis"])
def test_a_large_payload_is_stored_once_and_read_from_its_slot(kind: str, make_backend: MakeBackend) -> None:
    backend = make_backend(kind)
    buffer = ContextBuffer(backend)
    small, small_task, _ = _submit(backend, buffer, "<small/>")
    msg, task, index = _submit(backend, buffer, BIG)
    assert index == 1
    ref = backend.temp_get(task.payload_key)
    assert ref is not None and len(ref) < 300  # a reference, not a second copy of the payload
    inline = backend.temp_get(small_task.payload_key)
    assert inline is not None and b"<small/>" in inline  # small payloads are still copied
    assert load_inputs(backend, task) == msg
    assert load_inputs(backend, small_task) == small
    result = execute_task(backend, task, worker="w")
    assert result.ok and result.response_key is not None
    backend.temp_delete(task.payload_key, task.metadata_key, small_task.payload_key, small_task.metadata_key,
                        result.response_key)


def test_the_reference_follows_the_index_a_moved_append_lands_at(make_backend: MakeBackend) -> None:
    backend = make_backend("redis")
    mine, other = ContextBuffer(backend), ContextBuffer(backend)
    assert mine.expected_index("t1") == 0
    other.append("t1", Message("console", "work", "<first/>", thread="t1"), "console", "work")
    msg, task, index = _submit(backend, mine, BIG)  # signed for 0 first, "moved", signed again for 1
    assert index == 1
    assert load_inputs(backend, task) == msg


def test_a_tampered_slot_is_an_integrity_error_and_nothing_runs(make_backend: MakeBackend, raw: redis.Redis) -> None:
    backend = make_backend("redis")
    buffer = ContextBuffer(backend)
    _msg, task, index = _submit(backend, buffer, BIG)
    key = backend.keys.buffer("t1")  # type: ignore[attr-defined]
    blob = bytearray(raw.lindex(key, index))  # type: ignore[arg-type]
    blob[-20] ^= 1  # one bit of the pickled payload
    raw.lset(key, index, bytes(blob))
    with pytest.raises(SlotIntegrityError, match="thread 't1' slot 0 .*signature does not match"):
        load_inputs(backend, task)
    result = execute_task(backend, task, worker="w")
    assert not result.ok and result.error_type == INTEGRITY_ERROR and result.response_key is None


def test_a_reference_to_another_messages_slot_is_refused(make_backend: MakeBackend) -> None:
    backend = make_backend("redis")
    buffer = ContextBuffer(backend)
    _a, task_a, _ = _submit(backend, buffer, BIG)
    _b, task_b, _ = _submit(backend, buffer, BIG.replace("x", "y"))
    # A's payload reference (genuine, signed) paired with B's metadata: the slot it names is A's.
    swapped = WorkerTask("swap", "work", HANDLER, task_a.payload_key, task_b.metadata_key)
    with pytest.raises(SlotIntegrityError, match="slot of another message"):
        load_inputs(backend, swapped)
    assert execute_task(backend, swapped).error_type == INTEGRITY_ERROR


def test_a_slot_of_another_message_at_the_referenced_index_is_refused(make_backend: MakeBackend,
                                                                       raw: redis.Redis) -> None:
    backend = make_backend("redis")
    buffer = ContextBuffer(backend)
    _a, task, index = _submit(backend, buffer, BIG)
    # Another genuine slot signed for the same place (thread t1, index 0) under another append id,
    # as a writer with the key could: the reference's index now holds a slot that verifies there.
    other = backend.signer.place(backend.slot_namespace, "t1").sign(index, b"someone-else",  # type: ignore[attr-defined]
                                                                     b"not this message")
    raw.lset(backend.keys.buffer("t1"), index, other)  # type: ignore[attr-defined]
    with pytest.raises(SlotIntegrityError, match="holds another message"):
        load_inputs(backend, task)


def test_a_forged_reference_is_refused(make_backend: MakeBackend) -> None:
    backend = make_backend("redis")
    buffer = ContextBuffer(backend)
    _msg, task, _ = _submit(backend, buffer, BIG)
    backend.temp_put(task.payload_key, Signer.random().sign(b'S{"thread":"t1","index":0,"id":"x"}'))
    with pytest.raises(SlotIntegrityError, match="key this process does not know"):
        load_inputs(backend, task)


def test_a_gone_slot_is_missing_data(make_backend: MakeBackend) -> None:
    backend = make_backend("redis")
    buffer = ContextBuffer(backend)
    _msg, task, _ = _submit(backend, buffer, BIG)
    buffer.delete_thread("t1")
    with pytest.raises(LookupError, match="is gone"):
        load_inputs(backend, task)
    assert execute_task(backend, task).error_type == MISSING_DATA


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_a_repeated_append_refers_to_the_first_slot(kind: str, make_backend: MakeBackend) -> None:
    """A conversation run again (a pump taking over) appends its message again under the same append
    id: the backend answers with the first slot, elsewhere than the index the values were made for."""
    backend = make_backend(kind)
    buffer = ContextBuffer(backend)
    msg, _task, first = _submit(backend, buffer, BIG)
    buffer.append("t1", Message("console", "work", "<later/>", thread="t1"), "console", "work")
    inputs = worker_inputs(backend, msg)  # the same message again: expected index 2, stored at 0
    slot = buffer.append_and_put("t1", msg, msg.sender, msg.to, own_name=msg.to, append_id=msg.id,
                                 temps=inputs.items)
    assert slot.index == first == 0 and buffer.thread_len("t1") == 2
    again = WorkerTask("again", "work", HANDLER, *inputs.keys)
    assert load_inputs(backend, again) == msg
