"""What a slot pickles to: still a BufferSlot (the spec's format), in a flat form that is cheaper to
write and read, while slots pickled the dataclass default way (already stored) stay readable."""
from __future__ import annotations

import base64
import pickle
from dataclasses import dataclass

import pytest

from xml_pipeline.errors import BackendError
from xml_pipeline.memory import InMemoryBackend
from xml_pipeline.memory.context_buffer import ContextBuffer
from xml_pipeline.memory.slots import BufferSlot, SlotMetadata
from xml_pipeline.message_bus.message import Message, MessageError

#: pickle.dumps(BufferSlot(Message(...), SlotMetadata(...)), 5) as the library wrote it before slots
#: and messages reduced to flat tuples (copyreg.__newobj__ and the dataclass state per object).
DEFAULT_FORM = base64.b64decode(
    "gAWVbAEAAAAAAACMGXhtbF9waXBlbGluZS5tZW1vcnkuc2xvdHOUjApCdWZmZXJTbG90lJOUKYGUfZQojAdwYXlsb2FklIwg"
    "eG1sX3BpcGVsaW5lLm1lc3NhZ2VfYnVzLm1lc3NhZ2WUjAdNZXNzYWdllJOUKYGUXZQojAdjb25zb2xllIwEd29ya5SMBDx3"
    "Lz6UjAJ0MZSMB3JlcXVlc3SUjAJtMZROZWKMCG1ldGFkYXRhlGgAjAxTbG90TWV0YWRhdGGUk5QpgZR9lCiMCXRocmVhZF9p"
    "ZJRoDowHZnJvbV9pZJRoC4wFdG9faWSUaAyMCnNsb3RfaW5kZXiUSv////+MCXRpbWVzdGFtcJSMGTIwMjYtMTEtMzBUMDc6"
    "MDA6MDArMDA6MDCUjAxwYXlsb2FkX3R5cGWUaAeMCG93bl9uYW1llGgMjAxpc19zZWxmX2NhbGyUiYwSdXNhZ2VfaW5zdHJ1"
    "Y3Rpb25zlIwAlHVidWIu")


def _slot() -> BufferSlot:
    return BufferSlot(payload=Message("console", "work", "<w/>", thread="t1", id="m1"),
                      metadata=SlotMetadata("t1", "console", "work", -1, "2026-11-30T07:00:00+00:00", "Message",
                                            own_name="work"))


def test_a_slot_pickles_to_a_buffer_slot_holding_an_equal_message() -> None:
    slot = _slot()
    body = pickle.dumps(slot, pickle.HIGHEST_PROTOCOL)
    back = pickle.loads(body)
    assert type(back) is BufferSlot and type(back.metadata) is SlotMetadata and type(back.payload) is Message
    assert back == slot and back.payload == slot.payload and hash(back.payload) == hash(slot.payload)
    assert len(body) < len(DEFAULT_FORM)  # the flat form is also smaller (208 vs 375 bytes here)
    assert pickle.loads(pickle.dumps(slot.metadata)) == slot.metadata


def test_a_slot_pickled_the_dataclass_default_way_still_loads() -> None:
    assert b"SlotMetadata" in DEFAULT_FORM and b"_slot" not in DEFAULT_FORM  # the default shape: a state per class
    assert pickle.loads(DEFAULT_FORM) == _slot()


def test_a_stored_slot_in_the_default_form_reads_back_through_the_buffer() -> None:
    backend = InMemoryBackend()
    buffer = ContextBuffer(backend)
    place = backend.signer.place(backend.slot_namespace, "t1")
    assert backend.buffer_append_at("t1", place.sign(0, b"m1", DEFAULT_FORM), 0).status == "stored"
    buffer.append("t1", Message("work", "console", "<r/>", thread="t1", id="m2"), "work", "console")
    first, second = buffer.get_thread_slots("t1")
    assert first.payload == _slot().payload and first.index == 0 and first.metadata.own_name == "work"
    assert second.payload.payload == "<r/>" and second.index == 1


def test_unpickled_messages_are_equal_but_with_revalidates_what_changed() -> None:
    msg = pickle.loads(pickle.dumps(Message("console", "work", "<w/>", thread="t1", id="m1")))
    assert msg.with_(thread="t2").thread == "t2" and msg.with_(thread="t2").id == "m1"
    with pytest.raises(MessageError, match="'thread' must match"):
        msg.with_(thread="not an id")
    with pytest.raises(MessageError, match="'from' must be a name"):
        msg.with_(sender="a.b")
    with pytest.raises(TypeError, match="no field 'colour'"):
        msg.with_(colour="red")


@dataclass(frozen=True)
class _TaggedMetadata(SlotMetadata):
    tag: str = ""


@dataclass(frozen=True, slots=True)
class _TaggedMessage(Message):
    tag: str = ""


def test_subclasses_keep_their_type_and_fields_through_pickle() -> None:
    meta = _TaggedMetadata("t1", "a", "b", -1, "ts", "x", tag="m")
    slot = BufferSlot(payload=_TaggedMessage("console", "work", "<w/>", thread="t1", tag="p"), metadata=meta)
    back = pickle.loads(pickle.dumps(slot, pickle.HIGHEST_PROTOCOL))
    assert back == slot and type(back.metadata) is _TaggedMetadata and back.metadata.tag == "m"
    assert type(back.payload) is _TaggedMessage and back.payload.tag == "p"


def test_a_thread_read_whole_takes_subclasses_and_names_what_is_not_a_slot_of_it() -> None:
    """ContextBuffer.get_thread_slots: a signed slot whose metadata is a subclass reads back (with its
    index set); a signed body that is no BufferSlot, or another thread's slot signed for this place,
    raises BackendError naming the slot."""
    backend = InMemoryBackend()
    buffer = ContextBuffer(backend)
    place = backend.signer.place(backend.slot_namespace, "t1")
    tagged = BufferSlot(payload="p", metadata=_TaggedMetadata("t1", "a", "b", -1, "ts", "str", tag="m"))
    backend.buffer_append_at("t1", place.sign(0, b"", pickle.dumps(tagged, 5)), 0)
    buffer.append("t1", "plain", "a", "b")
    first, second = buffer.get_thread_slots("t1")
    assert type(first.metadata) is _TaggedMetadata and first.metadata.tag == "m" and first.index == 0
    assert second.payload == "plain" and second.index == 1 and type(second.metadata) is SlotMetadata
    for index, body in ((2, pickle.dumps("not a slot", 5)),
                        (2, pickle.dumps(BufferSlot("x", SlotMetadata("t2", "a", "b", -1, "ts", "str")), 5))):
        bad = InMemoryBackend(signer=backend.signer)
        for blob in backend.buffer_get_thread("t1"):
            bad.buffer_append("t1", blob)
        bad.buffer_append("t1", place.sign(index, b"", body))
        with pytest.raises(BackendError, match="thread 't1' slot 2 holds a (str|BufferSlot), not a BufferSlot of this thread"):
            ContextBuffer(bad).get_thread_slots("t1")
