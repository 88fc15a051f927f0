"""Bytes written straight into Redis (forged, corrupted, foreign) never get unpickled: reading them
through ContextBuffer raises SlotIntegrityError and runs nothing."""
from __future__ import annotations

import os
import pickle
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis_server import RedisServer

from xml_pipeline.errors import SlotIntegrityError
from xml_pipeline.memory.config import BackendConfig
from xml_pipeline.memory.context_buffer import ContextBuffer
from xml_pipeline.memory.redis_backend import RedisBackend
from xml_pipeline.memory.signing import MAGIC, VERSION, Signer

KEY = "test-signing-key-0123456789abcdef"


class Exploit:
    """A pickle that runs a shell command when loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, ...]:
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def setup(redis_server: RedisServer) -> Iterator[tuple[RedisBackend, ContextBuffer, redis.Redis]]:
    backend = RedisBackend(BackendConfig(backend_type="redis", redis_url=redis_server.url, signing_key=KEY,
                                         redis_prefix=f"integ{secrets.token_hex(4)}:"))
    raw = redis_server.client()
    yield backend, ContextBuffer(backend), raw
    backend.buffer_clear()
    backend.close()
    raw.close()


def forged_blobs(marker: Path, genuine: bytes) -> dict[str, bytes]:
    evil = pickle.dumps(Exploit(marker))
    other = Signer.random()  # somebody else's key
    header = MAGIC + bytes((VERSION,)) + genuine[4:8]  # our key id, but no valid MAC
    return {
        "raw pickle": evil,
        "envelope with our key id and a made-up MAC": header + b"\0" * 32 + evil,
        "pickle signed with a foreign key": other.sign(evil),
        "truncated": genuine[:-3],
        "one flipped bit": genuine[:-1] + bytes((genuine[-1] ^ 1,)),
        "empty": b"",
    }


def test_forged_or_corrupted_slots_raise_and_run_nothing(setup: tuple[RedisBackend, ContextBuffer, redis.Redis],
                                                         tmp_path: Path) -> None:
    backend, buffer, raw = setup
    marker = tmp_path / "pwned"
    assert os.system("true") == 0  # the exploit would work if it were ever unpickled
    buffer.append("t", "hello", from_id="a", to_id="b")
    buffer.append("t", "world", from_id="b", to_id="a")
    genuine = raw.lindex(backend.keys.buffer("t"), 1)
    for name, blob in forged_blobs(marker, genuine).items():
        raw.lset(backend.keys.buffer("t"), 1, blob)
        with pytest.raises(SlotIntegrityError):
            buffer.get_thread_slots("t")
        with pytest.raises(SlotIntegrityError):
            buffer.get_slot("t", 1)
        assert buffer.get_slot("t", 0).payload == "hello", name  # the intact slot still reads
        assert not marker.exists(), f"{name}: the forged pickle ran"
    raw.lset(backend.keys.buffer("t"), 1, genuine)
    assert [s.payload for s in buffer.get_thread_slots("t")] == ["hello", "world"]


def test_a_rotated_key_ring_still_reads_old_slots(redis_server: RedisServer) -> None:
    prefix = f"rot{secrets.token_hex(4)}:"
    old_key, new_key = "old-key-0123456789abcdef", "new-key-0123456789abcdef"
    cfg = BackendConfig(backend_type="redis", redis_url=redis_server.url, redis_prefix=prefix, signing_key=old_key)
    with RedisBackend(cfg) as before:
        ContextBuffer(before).append("t", "signed with the old key", from_id="a", to_id="b")
    with RedisBackend(cfg.replace(signing_key=f"{new_key},{old_key}")) as after:
        buffer = ContextBuffer(after)
        buffer.append("t", "signed with the new key", from_id="a", to_id="b")
        assert [s.payload for s in buffer.get_thread_slots("t")] == ["signed with the old key",
                                                                     "signed with the new key"]
    with RedisBackend(cfg.replace(signing_key=new_key)) as dropped:  # old key retired
        with pytest.raises(SlotIntegrityError):
            ContextBuffer(dropped).get_thread_slots("t")
        dropped.buffer_clear()
