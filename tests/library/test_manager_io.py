"""Connection messages without the stdlib's copies (memory/manager_io.py), on real socket pairs and a
real manager server.

The bytes on the wire are the stdlib Connection's: either end may be a stdlib Connection. A large
message crosses a socket whose buffer is far smaller than it (partial writes and reads); the
receive buffer is reused, and nothing unpickled from it changes when the next message overwrites
it; a peer that closes before or inside a message raises what Connection.recv raises.
"""
from __future__ import annotations

import os
import pickle
import secrets
import socket
import threading
from collections.abc import Iterator
from multiprocessing import connection as mpc
from typing import Any

import pytest

from xml_pipeline.memory import BackendConfig, ManagerBackend, manager_io
from xml_pipeline.memory.context_buffer import ContextBuffer
from xml_pipeline.memory.manager_io import BufferedConnection, Receiver, send_obj

BIG = 3 << 20  # well over a Unix socket's buffer: every write and read of it is partial


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    for s in (a, b):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32 * 1024)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
    yield a, b
    a.close()
    b.close()


def in_thread(fn: Any, *args: Any) -> dict[str, Any]:
    """Run fn(*args) in a thread (the reader of a message larger than the socket's buffer)."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = fn(*args)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out["error"] = e

    t = threading.Thread(target=run)
    t.start()
    out["thread"] = t
    return out


def joined(out: dict[str, Any]) -> Any:
    out["thread"].join(30)
    assert not out["thread"].is_alive()
    if "error" in out:
        raise out["error"]
    return out["value"]


def message(size: int, fill: bytes = b"s") -> tuple[str, tuple[Any, ...], dict[str, Any]]:
    # The shape of a manager request: a large slot and a large str among small values.
    return ("xp-store", (fill * size, "t" * size, 3, None), {"append_id": "a-1", "items": []})


def test_a_stdlib_connection_reads_what_send_obj_writes(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    reader = mpc.Connection(os.dup(b.fileno()))
    for size in (10, BIG):
        got = in_thread(reader.recv)
        send_obj(a.fileno(), message(size))
        assert joined(got) == message(size)
    reader.close()


def test_a_receiver_reads_what_a_stdlib_connection_sends(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    writer = mpc.Connection(os.dup(a.fileno()))
    receiver = Receiver()
    for size in (BIG, 10, BIG + 1):
        sent = in_thread(writer.send, message(size))
        assert receiver.recv(b.fileno()) == message(size)
        joined(sent)
    writer.close()


def test_a_small_message_that_does_not_fit_the_socket_at_once(pair: tuple[socket.socket, socket.socket]) -> None:
    """A message under the one-read size but over the socket's 32 KiB buffer: its single write and
    its single read are partial, and the rest follows (both ways, against the stdlib's ends)."""
    a, b = pair
    stdlib_reader, stdlib_writer = mpc.Connection(os.dup(b.fileno())), mpc.Connection(os.dup(a.fileno()))
    receiver = Receiver()
    for size in (20_000, 40_000, 60_000):
        got = in_thread(stdlib_reader.recv)
        send_obj(a.fileno(), ("x", b"s" * size))
        assert joined(got) == ("x", b"s" * size)
        sent = in_thread(stdlib_writer.send, ("y", b"t" * size))
        assert receiver.recv(b.fileno()) == ("y", b"t" * size)
        joined(sent)
    stdlib_reader.close()
    stdlib_writer.close()


def test_a_small_message_that_arrives_in_pieces(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    data = pickle.dumps(("piece", "z" * 1000))
    framed = len(data).to_bytes(4, "big") + data
    got = in_thread(Receiver().recv, b.fileno())
    a.sendall(framed[:600])  # the length and part of the body: the one read gets only that
    threading.Event().wait(0.2)
    a.sendall(framed[600:])
    assert joined(got) == ("piece", "z" * 1000)


def test_the_wire_bytes_are_the_stdlib_connections(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    obj = message(100_000)
    expected = len(pickle.dumps(obj))  # what Connection.send frames: a 4-byte length, then the pickle
    got = in_thread(lambda: mpc.Connection(os.dup(b.fileno())).recv_bytes())
    send_obj(a.fileno(), obj)
    raw = joined(got)
    assert len(raw) == expected
    assert pickle.loads(raw) == obj


def test_the_buffer_is_reused_and_what_was_unpickled_from_it_stays(
        pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    receiver = Receiver()
    first = in_thread(receiver.recv, b.fileno())
    send_obj(a.fileno(), message(BIG, b"1"))
    one = joined(first)
    kept = receiver._buf  # noqa: SLF001 - the buffer the next message is read into
    second = in_thread(receiver.recv, b.fileno())
    send_obj(a.fileno(), message(BIG, b"2"))
    two = joined(second)
    assert receiver._buf is kept  # noqa: SLF001
    assert one == message(BIG, b"1") and two == message(BIG, b"2")  # the first not overwritten


def test_a_message_over_the_kept_size_gets_its_own_buffer(
        pair: tuple[socket.socket, socket.socket], monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = pair
    monkeypatch.setattr(manager_io, "KEEP_BUFFER", 1 << 20)
    receiver = Receiver()
    got = in_thread(receiver.recv, b.fileno())
    send_obj(a.fileno(), message(BIG))
    assert joined(got) == message(BIG)
    assert len(receiver._buf) == 0  # noqa: SLF001 - not kept: a one-off message does not pin 3 MiB


def test_more_parts_than_one_writev_takes(pair: tuple[socket.socket, socket.socket],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = pair
    monkeypatch.setattr(manager_io, "_IOV_MAX", 3)
    obj = [bytes([i]) * (70 * 1024) for i in range(10)]  # each passed to the file as its own part
    got = in_thread(Receiver().recv, b.fileno())
    send_obj(a.fileno(), obj)
    assert joined(got) == obj


def test_a_peer_closing_before_a_message_is_eof_and_inside_one_an_oserror(
        pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    receiver = Receiver()
    a.sendall(b"\x00\x00\x01\x00" + b"x" * 10)  # a 256-byte message cut after 10 bytes
    a.shutdown(socket.SHUT_WR)
    with pytest.raises(OSError, match="end of file during message"):
        receiver.recv(b.fileno())
    c, d = socket.socketpair()
    c.close()
    with pytest.raises(EOFError):
        receiver.recv(d.fileno())
    d.close()


def test_a_buffered_connection_is_a_connection(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    left, right = BufferedConnection(os.dup(a.fileno())), BufferedConnection(os.dup(b.fileno()))
    got = in_thread(right.recv)
    left.send(message(BIG))
    assert joined(got) == message(BIG)
    right.send(("#RETURN", 7))
    assert left.recv() == ("#RETURN", 7)
    left.close()
    with pytest.raises(OSError):
        left.send(1)  # closed, as a stdlib Connection says
    right.close()


def test_large_slots_through_the_manager_server() -> None:
    backend = ManagerBackend(BackendConfig(backend_type="manager", signing_key="manager-io-tests-key-0123456789"))
    try:
        buffer = ContextBuffer(backend)
        thread = secrets.token_hex(8)
        payloads = ["a" * BIG, "b" * 10, "c" * (BIG // 2)]
        for p in payloads:
            buffer.append(thread, p, "console", "work")
        assert [s.payload for s in buffer.get_thread_slots(thread)] == payloads
        assert backend.buffer_append_many([]) == []
    finally:
        backend.close()
