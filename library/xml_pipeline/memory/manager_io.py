"""multiprocessing Connection messages without the stdlib's copies of large payloads.

The stdlib's `Connection.send` pickles into a BytesIO (one copy of every large bytes or str in the
message) and `recv` reads in chunks, each a new bytes object of up to the whole remaining size, that
it copies into another BytesIO before unpickling (so a 1 MiB slot costs the receiver three copies
and a page fault per 4 KiB of fresh memory). Here:

- `send_obj` pickles with the same pickler and protocol into a list of parts — the C pickler hands
  every bytes/str payload of 64 KiB or more to the file's `write` as is, not copied into its
  buffer — and writes the stdlib's frame (a 4-byte big-endian length, -1 plus 8 bytes beyond
  2 GiB) and the parts with one `os.writev`.
- `Receiver` reads a message into a buffer it keeps (up to `KEEP_BUFFER` bytes) and unpickles
  from it: one copy from the kernel, into memory that is already mapped.

The bytes on the wire are exactly the stdlib's, so either end may be a stdlib Connection. Used by
the manager client and server (manager.py, manager_server.py) and the local worker pool's pipes
(message_bus/local_pool.py). Unpickling reads the buffer only; nothing unpickled refers to it (an
in-band pickle builds its own objects), which is what makes reusing it safe.
"""
from __future__ import annotations

import os
import pickle
import socket
import struct
from collections.abc import Callable
from multiprocessing import connection as mpc
from multiprocessing.reduction import ForkingPickler
from typing import Any

__all__ = ["BufferedConnection", "KEEP_BUFFER", "Receiver", "frame", "send_obj", "send_some", "write_all"]

_LEN = struct.Struct("!i")
_LEN64 = struct.Struct("!Q")
_MAX32 = 0x7FFFFFFF
#: A receive buffer up to this size is kept for the next message; a larger message gets its own.
KEEP_BUFFER = 8 << 20
#: A message up to this size is read with one plain read when it is all there (the common case).
_SMALL = 64 << 10
#: Buffers per writev call (Linux's IOV_MAX is 1024).
_IOV_MAX = 512


class _Parts:
    """The file a pickler writes to: the written objects, kept as they are (never copied)."""

    __slots__ = ("parts", "size")

    def __init__(self) -> None:
        self.parts: list[Any] = []
        self.size = 0

    def write(self, data: Any) -> int:
        n = len(data) if type(data) is bytes else memoryview(data).nbytes
        self.parts.append(data)
        self.size += n
        return n


def frame(obj: object, pickler: Callable[..., Any] = ForkingPickler, protocol: int | None = None) -> list[Any]:
    """`obj` as `Connection.send` frames it (pickled by `pickler(file, protocol)`), as a list of
    parts: the length, then what the pickler wrote (large payloads as their own objects)."""
    out = _Parts()
    pickler(out, protocol).dump(obj)
    n = out.size
    head = _LEN.pack(n) if n <= _MAX32 else _LEN.pack(-1) + _LEN64.pack(n)
    return [head, *out.parts]


def send_obj(fd: int, obj: object, pickler: Callable[..., Any] = ForkingPickler, protocol: int | None = None) -> None:
    """Send `obj` on `fd` as `Connection.send` would (pickled by `pickler(file, protocol)`)."""
    parts = frame(obj, pickler, protocol)
    if len(parts) == 2 and type(parts[1]) is bytes and len(parts[1]) <= _SMALL:
        # A small message (one part): one plain write, as the stdlib's.
        data = parts[0] + parts[1]
        written = os.write(fd, data)
        if written == len(data):
            return
        parts = _after([data], written)  # a full socket buffer took part of it: the rest below (rare)
    write_all(fd, parts)


def write_all(fd: int, parts: list[Any]) -> None:
    """os.writev until every byte of `parts` is written (a socket takes what its buffer holds)."""
    while parts:
        parts = _after(parts, os.writev(fd, parts[:_IOV_MAX]))


def send_some(sock: socket.socket, parts: list[Any]) -> list[Any]:
    """Send what `sock` takes of `parts` now, without waiting; the rest (views of what was cut).
    MSG_DONTWAIT makes this one call non-blocking, whatever the socket's mode (a blocking reader of
    the same socket stays blocking)."""
    while parts:
        try:
            sent = sock.sendmsg(parts[:_IOV_MAX], (), socket.MSG_DONTWAIT)
        except BlockingIOError:
            return parts
        parts = _after(parts, sent)
    return parts


def _after(parts: list[Any], done: int) -> list[Any]:
    """`parts` without their first `done` bytes."""
    for i, part in enumerate(parts):
        n = len(part) if type(part) is bytes else memoryview(part).nbytes
        if done < n:
            return [memoryview(part).cast("B")[done:] if done else part, *parts[i + 1:]]
        done -= n
    return []


class Receiver:
    """Reads Connection messages from one fd into a buffer it reuses (one reader at a time)."""

    __slots__ = ("_buf", "loads")

    def __init__(self, loads: Callable[[Any], Any] = pickle.loads) -> None:
        self._buf = bytearray()
        self.loads = loads

    def recv(self, fd: int) -> Any:
        """The next message's object; EOFError if the peer closed before it, OSError within it."""
        head = _read_exact(fd, 4, first=True)
        (size,) = _LEN.unpack(head)
        got = b""
        if size == -1:
            (size,) = _LEN64.unpack(_read_exact(fd, 8))
        elif size <= _SMALL:
            # Most messages (a registry call, an append's reply) are small and already there whole:
            # one read, no buffer to manage.
            got = os.read(fd, size)
            if len(got) == size:
                return self.loads(got)
            if not got:
                raise OSError("got end of file during message")
        buf = self._buf
        if size > len(buf):
            buf = bytearray(size)
            if size <= KEEP_BUFFER:
                self._buf = buf
        with memoryview(buf) as whole, whole[:size] as view:
            pos = len(got)
            view[:pos] = got
            while pos < size:
                n = os.readv(fd, [view[pos:]])
                if n == 0:
                    raise OSError("got end of file during message")
                pos += n
            return self.loads(view)


def _read_exact(fd: int, n: int, *, first: bool = False) -> bytes:
    data = os.read(fd, n)
    if len(data) == n:
        return data
    if not data and first:
        raise EOFError
    while len(data) < n:
        more = os.read(fd, n - len(data))
        if not more:
            raise OSError("got end of file during message")
        data += more
    return data


class BufferedConnection(mpc.Connection):
    """A Connection whose `send` and `recv` take the paths above (same bytes on the wire)."""

    _receiver: Receiver | None = None

    def send(self, obj: Any) -> None:
        self._check_closed()  # type: ignore[attr-defined]
        self._check_writable()  # type: ignore[attr-defined]
        send_obj(self.fileno(), obj)

    def recv(self) -> Any:
        self._check_closed()  # type: ignore[attr-defined]
        self._check_readable()  # type: ignore[attr-defined]
        receiver = self._receiver
        if receiver is None:
            receiver = self._receiver = Receiver(ForkingPickler.loads)
        return receiver.recv(self.fileno())
