"""A payload over INLINE_PAYLOAD_MAX is not copied into a worker pod's task: the sealed input names
the message's slot, and the worker reads the payload from the slot after it verified at its place.
It travels and is signed once, and every integrity guarantee holds: a tampered slot, another
message's slot at the named place, a forged input and a gone slot all end in an error result, and no
handler runs on them. A worker still reads the temp-key form's slot reference (a task from a pump
that stored its inputs as temp values)."""
from __future__ import annotations

import json
from collections.abc import Callable

import pytest
import redis

from xml_pipeline.errors import SlotIntegrityError
from xml_pipeline.memory import ContextBuffer, SharedBackend
from xml_pipeline.memory.signing import Signer
from xml_pipeline.message_bus.message import Message
from xml_pipeline.message_bus.task_seal import namespace_of, open_input, seal_input
from xml_pipeline.message_bus.worker_task import (
    INLINE_PAYLOAD_MAX,
    INTEGRITY_ERROR,
    MISSING_DATA,
    WorkerTask,
    execute_task,
    input_values,
    load_inputs,
)

MakeBackend = Callable[..., SharedBackend]
BIG = "<big>" + "x" * (INLINE_PAYLOAD_MAX + 1000) + "</big>"
HANDLER = "xml_pipeline.examples.cpu:burn"


def _task(backend: SharedBackend, msg: Message, index: int, task_id: str = "") -> WorkerTask:
    task_id = task_id or f"task-{msg.id}"
    sealed = seal_input(backend.signer, namespace_of(backend), task_id, "work", HANDLER, msg, index)
    return WorkerTask(task_id, "work", HANDLER, "", "", sealed_input=sealed)


def _submit(backend: SharedBackend, buffer: ContextBuffer, payload: str, thread: str = "t1") -> tuple[Message, WorkerTask, int]:
    """What the pump and its dispatcher do for a cpu_bound message: append it, seal the task."""
    msg = Message("console", "work", payload, thread=thread)
    slot = buffer.append(thread, msg, msg.sender, msg.to, own_name=msg.to, append_id=msg.id)
    return msg, _task(backend, msg, slot.index), slot.index


def _open(backend: SharedBackend, task: WorkerTask) -> Message:
    return open_input(backend, task.task_id, task.listener, task.handler, task.sealed_input)


@pytest.mark.parametrize("kind", ["memory", "manager", "redis"])
def test_a_large_payload_is_stored_once_and_read_from_its_slot(kind: str, make_backend: MakeBackend) -> None:
    backend = make_backend(kind)
    buffer = ContextBuffer(backend)
    small, small_task, _ = _submit(backend, buffer, "<small/>")
    msg, task, index = _submit(backend, buffer, BIG)
    assert index == 1
    assert len(task.sealed_input) < 400  # a reference, not a second copy of the payload
    assert b"<small/>" in small_task.sealed_input  # small payloads are still copied
    assert _open(backend, task) == msg
    assert _open(backend, small_task) == small
    result = execute_task(backend, task, worker="w")
    assert result.ok and result.sealed_response and result.response_key is None


def test_the_reference_names_the_index_a_moved_append_lands_at(make_backend: MakeBackend) -> None:
    backend = make_backend("redis")
    mine, other = ContextBuffer(backend), ContextBuffer(backend)
    assert mine.expected_index("t1") == 0
    other.append("t1", Message("console", "work", "<first/>", thread="t1"), "console", "work")
    msg, task, index = _submit(backend, mine, BIG)  # signed for 0 first, "moved", signed again for 1
    assert index == 1
    assert _open(backend, task) == msg


def test_a_tampered_slot_is_an_integrity_error_and_nothing_runs(make_backend: MakeBackend, raw: redis.Redis) -> None:
    backend = make_backend("redis")
    buffer = ContextBuffer(backend)
    _msg, task, index = _submit(backend, buffer, BIG)
    key = backend.keys.buffer("t1")  # type: ignore[attr-defined]
    blob = bytearray(raw.lindex(key, index))  # type: ignore[arg-type]
    blob[-20] ^= 1  # one bit of the pickled payload
    raw.lset(key, index, bytes(blob))
    with pytest.raises(SlotIntegrityError, match="thread 't1' slot 0 .*signature does not match"):
        _open(backend, task)
    result = execute_task(backend, task, worker="w")
    assert not result.ok and result.error_type == INTEGRITY_ERROR and not result.sealed_response


def test_an_input_moved_to_another_task_is_refused(make_backend: MakeBackend) -> None:
    backend = make_backend("redis")
    buffer = ContextBuffer(backend)
    _a, task_a, _ = _submit(backend, buffer, BIG)
    # A's genuine sealed input under another task id, listener or handler: bound to A's.
    for moved in (WorkerTask("other", "work", HANDLER, "", "", sealed_input=task_a.sealed_input),
                  WorkerTask(task_a.task_id, "other", HANDLER, "", "", sealed_input=task_a.sealed_input),
                  WorkerTask(task_a.task_id, "work", "os:system", "", "", sealed_input=task_a.sealed_input)):
        with pytest.raises(SlotIntegrityError, match="signature does not match"):
            _open(backend, moved)
        assert execute_task(backend, moved).error_type == INTEGRITY_ERROR


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
        _open(backend, task)


def test_a_forged_input_is_refused(make_backend: MakeBackend) -> None:
    backend = make_backend("redis")
    msg = Message("console", "work", "<w/>", thread="t1")
    forged = seal_input(Signer.random(), namespace_of(backend), "t", "work", HANDLER, msg)
    with pytest.raises(SlotIntegrityError, match="key this process does not know"):
        _open(backend, WorkerTask("t", "work", HANDLER, "", "", sealed_input=forged))
    for garbage in (b"no separator", b"!!notbase64.body", b"." + forged.partition(b".")[2]):
        with pytest.raises(SlotIntegrityError, match="is not a sealed value|not a signed xml-pipeline envelope"):
            _open(backend, WorkerTask("t", "work", HANDLER, "", "", sealed_input=garbage))


def test_a_gone_slot_is_missing_data(make_backend: MakeBackend) -> None:
    backend = make_backend("redis")
    buffer = ContextBuffer(backend)
    _msg, task, _ = _submit(backend, buffer, BIG)
    buffer.delete_thread("t1")
    with pytest.raises(LookupError, match="is gone"):
        _open(backend, task)
    assert execute_task(backend, task).error_type == MISSING_DATA


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_a_repeated_append_refers_to_the_first_slot(kind: str, make_backend: MakeBackend) -> None:
    """A conversation run again (a pump taking over) appends its message again under the same append
    id: the backend answers with the first slot, and the task names that slot's index."""
    backend = make_backend(kind)
    buffer = ContextBuffer(backend)
    msg, _task0, first = _submit(backend, buffer, BIG)
    buffer.append("t1", Message("console", "work", "<later/>", thread="t1"), "console", "work")
    slot = buffer.append("t1", msg, msg.sender, msg.to, own_name=msg.to, append_id=msg.id)
    assert slot.index == first == 0 and buffer.thread_len("t1") == 2
    assert _open(backend, _task(backend, msg, slot.index, "again")) == msg


def test_the_temp_key_forms_slot_reference_is_still_read(make_backend: MakeBackend) -> None:
    """A task whose inputs a pump stored as temp values, with the payload as a signed reference to
    the message's slot: the worker reads and checks the slot as for a sealed input."""
    backend = make_backend("redis")
    buffer = ContextBuffer(backend)
    msg = Message("console", "work", BIG, thread="t1")
    slot = buffer.append("t1", msg, msg.sender, msg.to, own_name=msg.to, append_id=msg.id)
    (pk, mk), values = input_values(msg)
    ref = json.dumps({"thread": "t1", "index": slot.index, "id": msg.id}).encode()
    backend.temp_put_many([(pk, backend.signer.sign(b"S" + ref)), (mk, backend.signer.sign(values[1][1] + values[1][2]))])
    task = WorkerTask("old", "work", HANDLER, pk, mk)
    assert load_inputs(backend, task) == msg
    backend.temp_put(pk, Signer.random().sign(b"S" + ref))
    with pytest.raises(SlotIntegrityError, match="key this process does not know"):
        load_inputs(backend, task)
