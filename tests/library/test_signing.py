"""Safe serialization: a blob is unpickled only after its HMAC checked out.

The forged values below would run a command if unpickled (a __reduce__ that creates a marker file);
each test proves the payload is live, then that deserialize_slot refuses it and the marker never
appears.
"""
from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from pathlib import Path

import pytest

from xml_pipeline.errors import SlotIntegrityError
from xml_pipeline.memory import ContextBuffer, SharedBackend, deserialize_slot, serialize_slot
from xml_pipeline.memory.serialization import default_signer
from xml_pipeline.memory.signing import MAGIC, OVERHEAD, VERSION, Signer

MakeBackend = Callable[..., SharedBackend]
OLD_KEY = "old-signing-key-0123456789abcdef"
NEW_KEY = "new-signing-key-0123456789abcdef"


class RunsACommand:
    """Unpickling this runs `touch <marker>`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, ...]:
        return (os.system, (f"touch {self.marker}",))


def evil_pickle(marker: Path) -> bytes:
    return pickle.dumps(RunsACommand(marker))


def test_the_forged_payload_is_live(tmp_path: Path) -> None:
    marker = tmp_path / "control"
    pickle.loads(evil_pickle(marker))  # what a naive deserializer would do
    assert marker.exists()


def forgeries(marker: Path, genuine: bytes) -> dict[str, bytes]:
    body = evil_pickle(marker)
    key_id = genuine[4:8]
    return {
        "a raw pickle": body,
        "the envelope header without a MAC": MAGIC + bytes((VERSION,)) + key_id + body,
        "a zero MAC with the right key id": MAGIC + bytes((VERSION,)) + key_id + b"\0" * 32 + body,
        "genuine MAC, body swapped": genuine[:OVERHEAD] + body,
        "signed with the attacker's key": Signer((b"attacker-key-0123456789abcdef",)).sign(body),
        "a future envelope version": MAGIC + bytes((VERSION + 1,)) + genuine[4:],
    }


def test_forged_blobs_raise_and_run_nothing(tmp_path: Path) -> None:
    signer = Signer((NEW_KEY.encode(),))
    genuine = serialize_slot({"ok": True}, signer=signer)
    marker = tmp_path / "pwned"
    for name, blob in forgeries(marker, genuine).items():
        with pytest.raises(SlotIntegrityError):
            deserialize_slot(blob, signer=signer)
        assert not marker.exists(), f"{name} ran the command"


@pytest.mark.parametrize("cut", [1, 10, OVERHEAD, OVERHEAD + 1])
def test_truncated_blobs_raise(cut: int) -> None:
    signer = Signer((NEW_KEY.encode(),))
    genuine = serialize_slot({"some": "payload" * 10}, signer=signer)
    with pytest.raises(SlotIntegrityError):
        deserialize_slot(genuine[:-cut], signer=signer)
    with pytest.raises(SlotIntegrityError):
        deserialize_slot(genuine[:cut], signer=signer)


@pytest.mark.parametrize("foreign", [b"", b"hello", b'{"json": true}', b"XPS", "text", None, 42])
def test_foreign_values_raise(foreign: object) -> None:
    with pytest.raises(SlotIntegrityError):
        deserialize_slot(foreign)  # type: ignore[arg-type]


def test_rotation_old_key_verifies_as_a_fallback() -> None:
    old = Signer((OLD_KEY.encode(),))
    rotated = Signer((NEW_KEY.encode(), OLD_KEY.encode()))
    blob = serialize_slot("written before the rotation", signer=old)
    assert deserialize_slot(blob, signer=rotated) == "written before the rotation"
    assert serialize_slot("new", signer=rotated)[4:8] != blob[4:8]  # new blobs use the new key
    with pytest.raises(SlotIntegrityError, match="key this process does not know"):
        deserialize_slot(blob, signer=Signer((NEW_KEY.encode(),)))  # old key retired


def test_default_signer_follows_xp_signing_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XP_SIGNING_KEY", raising=False)
    random_key = default_signer()
    assert default_signer() is random_key  # one per process
    monkeypatch.setenv("XP_SIGNING_KEY", OLD_KEY)
    blob = serialize_slot("v1")
    assert default_signer().keys == (OLD_KEY.encode(),)
    monkeypatch.setenv("XP_SIGNING_KEY", f"{NEW_KEY},{OLD_KEY}")  # rotation applied to the env
    assert deserialize_slot(blob) == "v1"
    assert default_signer().keys[0] == NEW_KEY.encode()
    with pytest.raises(SlotIntegrityError):
        deserialize_slot(blob, signer=random_key)
    monkeypatch.delenv("XP_SIGNING_KEY")
    assert default_signer() is random_key


def test_forged_slot_in_a_backend_is_refused(any_backend: SharedBackend, tmp_path: Path) -> None:
    marker = tmp_path / "pwned-through-backend"
    buffer = ContextBuffer(any_backend)
    buffer.append("victim", "a genuine slot", "a", "b")
    any_backend.buffer_append("victim", evil_pickle(marker))  # someone with write access to the store
    any_backend.buffer_append("victim", Signer((b"attacker-key-0123456789abcdef",)).sign(evil_pickle(marker)))
    with pytest.raises(SlotIntegrityError):
        buffer.get_thread_slots("victim")
    with pytest.raises(SlotIntegrityError):
        buffer.get_slot("victim", 1)
    assert buffer.get_slot("victim", 0).payload == "a genuine slot"  # type: ignore[union-attr]
    assert not marker.exists()


def test_a_thread_read_whole_checks_each_slot_where_it_lies() -> None:
    """SlotPlace.bodies: the read of a whole thread. Slots of a rotated key ring, slots given as
    bytearray or memoryview and slots with long append ids all verify; a slot moved, forged, cut
    short or of an unknown key fails, naming its index, and nothing after it is returned."""
    old = Signer((OLD_KEY.encode(),))
    ring = Signer((NEW_KEY.encode(), OLD_KEY.encode()))
    before, after = old.place("ns", "t"), ring.place("ns", "t")
    bodies = [b"slot %d" % i * (i + 1) for i in range(8)]
    blobs: list[object] = [(before if i < 3 else after).sign(i, b"a" * (i * 30), body)
                           for i, body in enumerate(bodies)]
    blobs[4] = bytearray(blobs[4])  # type: ignore[arg-type]
    blobs[5] = memoryview(blobs[5])  # type: ignore[arg-type]
    reader = ring.place("ns", "t")
    assert reader.bodies(blobs) == bodies  # type: ignore[arg-type]
    assert reader.bodies(blobs) == bodies  # type: ignore[arg-type]  # a second read, every key known now

    def fails(broken: object, index: int, why: str) -> None:
        with pytest.raises(SlotIntegrityError, match=f"thread 't' slot {index}: .*{why}"):
            reader.bodies([*blobs[:index], broken, *blobs[index + 1:]])  # type: ignore[arg-type]

    fails(blobs[2], 6, "does not match here")  # a genuine slot moved to another index
    fails(ring.place("ns", "other").sign(6, b"", bodies[6]), 6, "does not match here")  # another thread's
    flipped = bytearray(blobs[7])  # type: ignore[arg-type]
    flipped[-1] ^= 1
    fails(bytes(flipped), 7, "does not match here")
    fails(bytes(blobs[3])[:OVERHEAD - 1], 3, "truncated or foreign")  # type: ignore[arg-type]
    fails(Signer((b"another-key-0123456789abcdef",)).place("ns", "t").sign(1, b"", b"x"), 1,
          "key this process does not know")
    # A head that claims a long append id the blob does not hold: the MAC fails before the length does.
    cut = bytearray(blobs[0])  # type: ignore[arg-type]
    cut[OVERHEAD - 1] = 200
    fails(bytes(cut), 0, "does not match here")
