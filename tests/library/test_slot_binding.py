"""Slots are bound to their place: the signature covers the backend's namespace (Redis prefix), the
thread id, the slot's index and its append id. Genuine slots moved anywhere else — another thread,
another prefix, a later position (replay), each other's positions (swap) — fail their check where
they now lie, with a SlotIntegrityError naming the thread and index, and nothing is unpickled.

Also: no Redis data is unpickled without a configured key (no key derived from the prefix), and an
append id reused for a different slot is refused instead of silently dropping the slot.
"""
from __future__ import annotations

import hashlib
import hmac
import multiprocessing
import os
import pickle
import secrets
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import library_workers
import pytest
import redis
from redis_server import RedisServer

from xml_pipeline.errors import AppendIdConflict, SlotIntegrityError
from xml_pipeline.memory import BackendConfig, ContextBuffer, SharedBackend
from xml_pipeline.memory.redis_backend import RedisBackend
from xml_pipeline.memory.signing import MAGIC, Signer, _key_id

MakeBackend = Callable[..., SharedBackend]
KEY = "binding-tests-signing-key-0123456789"
REPO = Path(__file__).resolve().parents[2]


class RunsACommand:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, ...]:
        return (os.system, (f"touch {self.marker}",))


def raw_slot(backend: SharedBackend, thread_id: str, index: int) -> bytes:
    blob = backend.buffer_get_slot(thread_id, index)
    assert blob is not None
    return blob


def redis_on(server: RedisServer, prefix: str | None = None, **config: object) -> RedisBackend:
    config.setdefault("signing_key", KEY)
    return RedisBackend(BackendConfig(backend_type="redis", redis_url=server.url,
                                      redis_prefix=prefix or f"bind{secrets.token_hex(4)}:", **config))  # type: ignore[arg-type]


# -- moved slots ----------------------------------------------------------------------------------


def test_a_slot_copied_to_another_thread_fails_there(any_backend: SharedBackend) -> None:
    buffer = ContextBuffer(any_backend)
    buffer.append("origin", "secret instructions", "a", "b")
    any_backend.buffer_append("victim", raw_slot(any_backend, "origin", 0))  # same index, other thread
    with pytest.raises(SlotIntegrityError, match=r"thread 'victim' slot 0: .*copied from another thread"):
        buffer.get_thread_slots("victim")
    with pytest.raises(SlotIntegrityError, match="thread 'victim' slot 0"):
        buffer.get_slot("victim", 0)
    assert [s.payload for s in buffer.get_thread_slots("origin")] == ["secret instructions"]


def test_an_old_slot_replayed_at_a_later_position_fails(any_backend: SharedBackend) -> None:
    buffer = ContextBuffer(any_backend)
    buffer.append("t", "approve the payment", "boss", "bank")
    buffer.append("t", "cancel it", "boss", "bank")
    any_backend.buffer_append("t", raw_slot(any_backend, "t", 0))  # replayed at position 2
    with pytest.raises(SlotIntegrityError, match="thread 't' slot 2"):
        buffer.get_thread_slots("t")
    with pytest.raises(SlotIntegrityError, match="thread 't' slot 2"):
        buffer.get_slot("t", -1)
    assert buffer.get_slot("t", 1).payload == "cancel it"  # type: ignore[union-attr]


def test_a_slot_copied_to_another_prefix_fails_there(redis_server: RedisServer) -> None:
    # Same server, same signing key, two tenants: the prefix is part of the signature.
    a, b = redis_on(redis_server), redis_on(redis_server)
    try:
        ContextBuffer(a).append("t", "tenant a's slot", "x", "y")
        b.buffer_append("t", raw_slot(a, "t", 0))
        with pytest.raises(SlotIntegrityError, match="thread 't' slot 0"):
            ContextBuffer(b).get_thread_slots("t")
    finally:
        for backend in (a, b):
            backend.buffer_clear()
            backend.close()


def test_swapped_and_truncated_slots_fail(redis_server: RedisServer) -> None:
    backend, raw = redis_on(redis_server), redis_server.client()
    buffer = ContextBuffer(backend)
    key = backend.keys.buffer("t")
    try:
        for text in ("first", "second", "third"):
            buffer.append("t", text, "a", "b")
        s0, s1 = raw.lindex(key, 0), raw.lindex(key, 1)
        raw.lset(key, 0, s1)
        raw.lset(key, 1, s0)
        with pytest.raises(SlotIntegrityError, match="thread 't' slot 0"):
            buffer.get_thread_slots("t")
        with pytest.raises(SlotIntegrityError, match="thread 't' slot 1"):
            buffer.get_slot("t", 1)
        raw.lset(key, 0, s0)
        raw.lset(key, 1, s1)
        assert [s.payload for s in buffer.get_thread_slots("t")] == ["first", "second", "third"]
        for cut in (1, 40, len(s1) - 45):
            raw.lset(key, 1, s1[:-cut])
            with pytest.raises(SlotIntegrityError, match="thread 't' slot 1"):
                buffer.get_thread_slots("t")
        raw.ltrim(key, 0, 1)  # a truncated thread is still a valid prefix of the log
        raw.lset(key, 1, s1)
        assert [s.payload for s in buffer.get_thread_slots("t")] == ["first", "second"]
    finally:
        backend.buffer_clear()
        backend.close()
        raw.close()


def test_a_version_1_envelope_is_refused_with_a_clear_error(any_backend: SharedBackend, tmp_path: Path) -> None:
    """What an older xml-pipeline wrote: MAGIC | 1 | key id | HMAC(header + body) | body, with the
    right key. It verifies nothing about its place, so it is refused, never unpickled."""
    marker = tmp_path / "v1-ran"
    key = any_backend.signer.keys[0]
    head = MAGIC + b"\x01" + _key_id(key)
    body = pickle.dumps(RunsACommand(marker))
    any_backend.buffer_append("legacy", head + hmac.new(key, head + body, hashlib.sha256).digest() + body)
    with pytest.raises(SlotIntegrityError, match=r"thread 'legacy' slot 0: envelope version 1 is refused"):
        ContextBuffer(any_backend).get_thread_slots("legacy")
    assert not marker.exists()


# -- no key: nothing derived from the prefix, nothing readable by other processes -------------------


def test_a_slot_forged_with_the_prefix_derived_key_never_runs(redis_server: RedisServer, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XP_SIGNING_KEY", raising=False)
    prefix = f"forge{secrets.token_hex(4)}:"
    backend = redis_on(redis_server, prefix, signing_key=None)  # no key configured
    marker = tmp_path / "pwned"
    assert os.system("true") == 0  # the payload would run if it were ever unpickled
    try:
        buffer = ContextBuffer(backend)
        buffer.append("t", "genuine", "a", "b")
        # A key derived from the prefix alone (no configured key): computable by anyone, so refused.
        h = hashlib.sha256(b"xml-pipeline derived signing key\x00")
        for part in (b"xml-pipeline redis backend", prefix.encode()):
            h.update(part + b"\x00")
        derived = Signer((h.digest(),))
        evil = pickle.dumps(RunsACommand(marker))
        bound = derived.place(prefix, "t").sign(1, b"", evil)  # correctly bound, wrong key
        backend.buffer_append("t", bound)
        with pytest.raises(SlotIntegrityError, match="thread 't' slot 1: .*key this process does not know"):
            buffer.get_thread_slots("t")
        with pytest.raises(SlotIntegrityError):
            buffer.get_slot("t", 1)
        assert not marker.exists()
        assert backend.signer.local and derived.keys != backend.signer.keys
    finally:
        backend.buffer_clear()
        backend.close()


def test_without_a_key_other_processes_cannot_read_but_children_get_the_key(
        redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XP_SIGNING_KEY", raising=False)
    prefix = f"nokey{secrets.token_hex(4)}:"
    backend = redis_on(redis_server, prefix, signing_key=None)
    buffer = ContextBuffer(backend)
    try:
        buffer.append("t", "from the parent", "p", "c")
        # A process started on its own (a separate `xml-pipeline worker`, say) has its own random key.
        env = {k: v for k, v in os.environ.items() if not k.startswith("XP_")}
        env["PYTHONPATH"] = str(REPO / "library")
        code = textwrap.dedent(f"""
            import warnings; warnings.simplefilter("ignore")
            from xml_pipeline.memory import BackendConfig, ContextBuffer
            from xml_pipeline.memory.redis_backend import RedisBackend
            b = RedisBackend(BackendConfig(backend_type="redis", redis_url={redis_server.url!r},
                                           redis_prefix={prefix!r}))
            ContextBuffer(b).append("s", "from a stranger", "x", "y")
            try:
                ContextBuffer(b).get_thread_slots("t")
            except Exception as e:
                print(type(e).__name__, e)
        """)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith("SlotIntegrityError thread 't' slot 0: envelope was signed with a key "
                                     "this process does not know (check XP_SIGNING_KEY"), out.stdout
        with pytest.raises(SlotIntegrityError, match="thread 's' slot 0: .*check XP_SIGNING_KEY"):
            buffer.get_thread_slots("s")
        # A child this process starts (spawn, as the local worker pool does) gets the key with the backend.
        ctx = multiprocessing.get_context("spawn")
        results = ctx.Queue()
        child = ctx.Process(target=library_workers.read_and_append, args=(backend, "t", results))
        child.start()
        status, seen, index, local = results.get(timeout=60)
        child.join(30)
        assert (status, seen, index, local) == ("ok", ["from the parent"], 1, True), seen
        assert [s.from_id for s in buffer.get_thread_slots("t")] == ["p", "child"]
    finally:
        backend.buffer_clear()
        backend.close()


@pytest.mark.parametrize("command", ["pump", "worker"])
def test_pump_and_worker_on_redis_refuse_to_start_without_a_key(command: str, redis_server: RedisServer,
                                                                tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("XP_")}
    env.update(PYTHONPATH=str(REPO / "library"), XP_BACKEND_TYPE="redis", XP_REDIS_URL=redis_server.url,
               XP_CONFIG=str(REPO / "examples/demo/organism.yaml"))
    r = subprocess.run([sys.executable, "-m", "xml_pipeline.cli", command], env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "XP_SIGNING_KEY: is not set" in lines[0] and "Traceback" not in r.stderr, r.stderr


# -- append ids: a repeat is the same append, a reused id is an error --------------------------------


def test_a_retried_append_is_stored_once(any_backend: SharedBackend) -> None:
    buffer = ContextBuffer(any_backend)
    buffer.append("t", "before", "a", "b")
    prepared = buffer.prepare("t", "the message", "a", "b", append_id="m-1")
    first = buffer.store(prepared)
    again = buffer.store(prepared)  # the same append sent again (its reply was lost, say)
    rebuilt = buffer.append("t", "the message", "a", "b", append_id="m-1")  # rebuilt: a new timestamp
    assert first.index == again.index == rebuilt.index == 1
    assert rebuilt.metadata.timestamp == first.metadata.timestamp  # the stored slot comes back
    assert [s.payload for s in buffer.get_thread_slots("t")] == ["before", "the message"]


def test_a_reused_append_id_with_a_different_slot_is_refused(any_backend: SharedBackend) -> None:
    buffer = ContextBuffer(any_backend)
    buffer.append("t", "first message", "a", "b", append_id="m-1")
    for payload, sender in (("another message", "a"), ("first message", "someone else")):
        with pytest.raises(AppendIdConflict, match="append id 'm-1' was already used in thread 't' for slot 0"):
            buffer.append("t", payload, sender, "b", append_id="m-1")
    buffer.append("t", "next", "a", "b", append_id="m-2")
    assert [s.payload for s in buffer.get_thread_slots("t")] == ["first message", "next"]  # nothing dropped
    # The bytes-level API: the same id with other bytes is refused too.
    assert any_backend.buffer_append("raw", b"one", append_id="r") == 0
    assert any_backend.buffer_append("raw", b"one", append_id="r") == 0
    with pytest.raises(AppendIdConflict):
        any_backend.buffer_append("raw", b"two", append_id="r")
    assert any_backend.buffer_thread_len("raw") == 1


def test_a_large_slot_signed_again_for_another_index_and_retried(any_backend: SharedBackend) -> None:
    """A large slot is kept once, inside its envelope: signed for a stale index, then for the real
    one (another writer's slot landed first), then sent again under its append id, it is stored
    once, verifies where it lies, and reads back whole."""
    big = "x" * (200 * 1024) + "end"
    mine, other = ContextBuffer(any_backend), ContextBuffer(any_backend)
    mine.append("t", "first", "a", "b")
    other.append("t", "overtakes", "a", "b")  # `mine` still expects index 1
    prepared = mine.prepare("t", big, "a", "b", append_id="big-1")
    pickled = bytes(prepared.body)
    stale = prepared.blob(1)
    assert isinstance(prepared.body, memoryview) and bytes(prepared.body) == pickled
    slot = mine.store(prepared)  # refused at 1 ("moved"), signed again for 2
    assert slot.index == 2 and slot.payload == big
    assert bytes(prepared.body) == pickled and prepared.blob(2) != stale
    assert mine.store(prepared).index == 2  # a retry: the stored slot, compared with the view
    assert [s.payload for s in ContextBuffer(any_backend).get_thread_slots("t")] == ["first", "overtakes", big]
    with pytest.raises(SlotIntegrityError):
        # The envelope signed for index 1 does not verify at 2.
        any_backend.signer.place(getattr(any_backend, "slot_namespace", ""), "t").open(stale, 2)


def test_writers_with_stale_expected_indexes_still_land_in_order(any_backend: SharedBackend) -> None:
    """Two buffers (two processes' views) alternate: each append first tries the index its buffer
    last saw, is told the real length, signs again, and lands there."""
    one, two = ContextBuffer(any_backend), ContextBuffer(any_backend)
    got = [(one if i % 2 else two).append("t", i, "w", "r").index for i in range(10)]
    assert got == list(range(10))
    assert [s.payload for s in ContextBuffer(any_backend).get_thread_slots("t")] == list(range(10))
    any_backend.buffer_delete_thread("t")
    assert one.append("t", "again", "w", "r").index == 0  # the thread was deleted by someone else


def test_unbound_module_level_round_trip() -> None:
    """serialize_slot / deserialize_slot without a signer: one process's own round trip, and an
    unbound blob never verifies inside a buffer (nor a buffer's slot as unbound)."""
    from xml_pipeline.memory import InMemoryBackend, deserialize_slot, serialize_slot
    blob = serialize_slot({"x": 1})
    assert deserialize_slot(blob) == {"x": 1}
    backend = InMemoryBackend()
    backend.buffer_append("t", serialize_slot("unbound", signer=backend.signer))
    with pytest.raises(SlotIntegrityError, match="thread 't' slot 0"):
        ContextBuffer(backend).get_thread_slots("t")
    ContextBuffer(backend).append("u", "bound", "a", "b")
    with pytest.raises(SlotIntegrityError):
        deserialize_slot(raw_slot(backend, "u", 0), signer=backend.signer)


def test_the_raw_redis_list_holds_bound_envelopes(redis_server: RedisServer) -> None:
    backend = redis_on(redis_server)
    raw: redis.Redis = redis_server.client()
    try:
        ContextBuffer(backend).append("t", "x", "a", "b", append_id="msg-9")
        blob = raw.lindex(backend.keys.buffer("t"), 0)
        assert blob[:4] == MAGIC + b"\x02" and blob[41:46] == b"msg-9"  # the append id, in clear
        aid, _ = backend.signer.place(backend.slot_namespace, "t").open(blob, 0)
        assert aid == b"msg-9"
        with pytest.raises(SlotIntegrityError):
            backend.signer.place(backend.slot_namespace, "t").open(blob, 1)
    finally:
        backend.buffer_clear()
        backend.close()
        raw.close()


def test_run_on_redis_without_a_key_hands_its_key_to_its_workers(redis_server: RedisServer, tmp_path: Path) -> None:
    """`xml-pipeline run` is one process tree: its spawned worker processes get the process-local
    key with the backend, so cpu_bound listeners work on Redis without a configured key."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("XP_")}
    env.update(PYTHONPATH=str(REPO / "library"), XP_BACKEND_TYPE="redis", XP_REDIS_URL=redis_server.url,
               XP_REDIS_PREFIX=f"run{secrets.token_hex(4)}:", XP_REDIS_TTL="60")
    from xml_pipeline.message_bus.message import Message
    messages = "\n".join(m.to_xml() for m in [Message("console", "primes", '<count below="100"/>'),
                                               Message("console", "greeter", '<greet name="Ada" lucky="10"/>')])
    (tmp_path / "in.xml").write_text(messages)
    r = subprocess.run([sys.executable, "-m", "xml_pipeline.cli", "run", str(REPO / "examples/demo/organism.yaml"),
                        "--input", str(tmp_path / "in.xml"), "--format", "text"], env=env, capture_output=True,
                       text=True, timeout=120, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert "count=\"25\"" in r.stdout and "there are 4 primes below 10" in r.stdout, r.stdout
    assert "no signing key" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_the_pump_keeps_the_history_when_a_message_id_is_reused(kind: str, make_backend: MakeBackend,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    """Two different messages with the same id into one thread: the second is refused at its append
    (logged, naming the id), the first one's history is intact; the same message again is a repeat."""
    import asyncio
    import logging

    from xml_pipeline.message_bus.message import Message
    from xml_pipeline.message_bus.stream_pump import StreamPump, run_messages
    from xml_pipeline.organism import parse_organism

    organism = parse_organism(textwrap.dedent("""
        organism: {name: reuse}
        listeners:
          - {name: greeter, handler: "xml_pipeline.examples.greeter:handle"}
    """), environ={})
    backend = make_backend(kind)
    first = Message("console", "greeter", '<greet name="Ada"/>', id="m" + secrets.token_hex(8))
    impostor = Message("console", "greeter", '<greet name="Mallory"/>', id=first.id)

    async def go() -> StreamPump:
        pump = StreamPump(organism, backend)
        await pump.start()
        await run_messages(pump, [first])
        await run_messages(pump, [impostor])
        await run_messages(pump, [first])  # really the same message again: a repeat, nothing stored
        await pump.stop()
        return pump

    with caplog.at_level(logging.ERROR):
        pump = asyncio.run(go())
    assert f"AppendIdConflict: append id '{first.id}' was already used" in caplog.text, caplog.text
    thread = pump.registry.get_or_create("system.reuse.console.greeter")
    payloads = [s.payload.payload for s in ContextBuffer(backend).get_thread_slots(thread)]
    assert payloads.count('<greet name="Ada"/>') == 1 and '<greet name="Mallory"/>' not in payloads


def test_a_tampered_append_id_record_is_detected(redis_server: RedisServer) -> None:
    """Pointing an append id's record at another slot cannot make a new append vanish as a 'repeat':
    the slot there was written under another append id."""
    backend, raw = redis_on(redis_server), redis_server.client()
    buffer = ContextBuffer(backend)
    try:
        buffer.append("t", "genuine", "a", "b", append_id="m-1")
        raw.hset(backend.keys.op("t"), "m-2", 0)  # someone with write access to the Redis
        with pytest.raises(SlotIntegrityError, match="thread 't' slot 0: the append id record points at a slot"):
            buffer.append("t", "must not vanish", "a", "b", append_id="m-2")
    finally:
        backend.buffer_clear()
        backend.close()
        raw.close()
