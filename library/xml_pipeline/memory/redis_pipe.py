"""RedisPipe: the pump's asyncio connection to Redis, with group commit.

The pump's hot path makes three Redis round trips per cpu_bound message (the request's append with
the worker's inputs, the response's take with the temp keys' delete, the reply's append), with
hundreds of conversations in flight. Through the blocking backend each is a hop to an io thread, a
pooled connection taken and given back, one write and one read: most of the pump's CPU per round
trip. Here they run in the event loop on one connection, and every command written during one loop
iteration leaves in **one write** (group commit): replies come back in order on the same
connection, one read often resolves dozens of waiting steps, and no thread is involved.

The commands are the backend's own (the same append script with its append id, the same SET EX,
GET + DEL), packed by the backend (`RedisBackend.pack_*`). What the pipe does NOT do is retry or
interpret trouble: `append_at` raises `Unsure` for anything but an answer of the append script
(stored, moved, repeat: a full thread, NOSCRIPT, a function not loaded, a refused command, a lost
connection), and the caller redoes the operation through the blocking backend, whose retries, EVAL
fallback, re-probe of FCALL/EVALSHA and errors are the contract's (the
append is idempotent through its append id, the SETs are plain overwrites). `take` is not
idempotent (GET + DEL): a lost connection raises BackendUnavailable, as the backend's temp_take does.

Supported: redis:// and unix:// URLs (rediss:// keeps the blocking path: `for_backend` returns None).
A reply overdue by socket_timeout fails every waiting command (the connection is dropped; the next
command reconnects), so nothing waits forever on a dead server.
"""
from __future__ import annotations

import asyncio
import collections
import socket
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from redis._parsers.base import BaseParser
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..errors import BackendError, BackendUnavailable
from .protocol import Appended

if TYPE_CHECKING:
    from .redis_backend import RedisBackend

__all__ = ["RedisPipe", "Unsure", "RespParser", "DirectConnection"]


class Unsure(Exception):
    """The fast path has no plain answer: redo the operation through the blocking backend."""


class _Incomplete(Exception):
    pass


class RespParser:
    """Incremental RESP2 reply parser: feed() bytes, pop() complete replies.

    Replies: simple strings and bulk strings as bytes (None for nil), integers as int, arrays as
    lists (None for nil), error replies as the exception redis-py would raise for them (NoScriptError
    for NOSCRIPT, ...), returned, not raised."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0

    def feed(self, data: bytes) -> None:
        self._buf += data

    def pop(self) -> tuple[bool, Any]:
        """(True, reply) for the next complete reply, (False, None) if more bytes are needed."""
        start = self._pos
        try:
            value = self._parse()
        except _Incomplete:
            self._pos = start
            return False, None
        return True, value

    def compact(self) -> None:
        if self._pos:
            del self._buf[:self._pos]
            self._pos = 0

    def _line(self) -> bytes:
        buf, pos = self._buf, self._pos
        end = buf.find(b"\r\n", pos)
        if end < 0:
            raise _Incomplete
        self._pos = end + 2
        return bytes(buf[pos:end])

    def _parse(self) -> Any:
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            pos = self._pos
            if len(self._buf) < pos + n + 2:
                raise _Incomplete
            self._pos = pos + n + 2
            return bytes(self._buf[pos:pos + n])
        if kind == b"+":
            return rest
        if kind == b"-":
            return BaseParser.parse_error(rest.decode("utf-8", "replace"))
        if kind == b"*":
            n = int(rest)
            if n < 0:
                return None
            return [self._parse() for _ in range(n)]
        raise BackendError(f"unexpected RESP reply type {kind!r} from Redis")


class _Protocol(asyncio.Protocol):
    def __init__(self, pipe: "RedisPipe") -> None:
        self._pipe = pipe

    def data_received(self, data: bytes) -> None:
        self._pipe._on_data(self, data)  # noqa: SLF001 - the pipe's own protocol

    def connection_lost(self, exc: Exception | None) -> None:
        self._pipe._on_lost(self, exc)  # noqa: SLF001


class _Request:
    __slots__ = ("future", "count", "replies")

    def __init__(self, future: asyncio.Future[list[Any]], count: int) -> None:
        self.future = future
        self.count = count
        self.replies: list[Any] = []


class RedisPipe:
    """One pipelined asyncio connection of a pump to its RedisBackend's server. Loop-bound: use it
    from one event loop (the pump's); `close()` when done."""

    def __init__(self, backend: "RedisBackend") -> None:
        self.backend = backend
        kw = backend.connection_kwargs()
        self._host: str | None = kw.get("host")
        self._port: int = int(kw.get("port") or 6379)
        self._path: str | None = kw.get("path")
        self._db = int(kw.get("db") or 0)
        self._username: str | None = kw.get("username")
        self._password: str | None = kw.get("password")
        self._client_name: str | None = kw.get("client_name")
        self._timeout = float(backend.config.socket_timeout)
        self._connect_timeout = float(backend.config.connect_timeout)
        self._transport: asyncio.Transport | None = None
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Future[None] | None = None
        self._parser = RespParser()
        self._waiting: collections.deque[_Request] = collections.deque()
        self._out: list[bytes] = []
        self._flush_pending = False
        self._timer: asyncio.TimerHandle | None = None
        self._progress = 0.0
        self._closed = False
        #: Writes sent and commands carried (tests count them: group commit means writes < commands).
        self.writes = 0
        self.commands = 0

    @classmethod
    def for_backend(cls, backend: Any) -> "RedisPipe | None":
        """A pipe for a RedisBackend on a redis:// or unix:// URL; None otherwise (keep the blocking path)."""
        from .redis_backend import RedisBackend
        if not isinstance(backend, RedisBackend) or not backend.pipe_capable():
            return None
        return cls(backend)

    # -- operations ---------------------------------------------------------------------------------
    async def append_at(self, thread_id: str, slot: bytes, index: int, *, max_slots: int | None,
                        append_id: str, items: Sequence[tuple[str, bytes]]) -> Appended:
        """The backend's buffer_append_at: what the compare-and-append did. Raises Unsure unless the
        script answered (stored, moved or repeat) and every put answered OK."""
        packed, count = self.backend.pack_append_at(thread_id, slot, index, max_slots=max_slots,
                                                    append_id=append_id, items=items)
        try:
            replies = await self.execute(packed, count)
        except BackendError as e:
            raise Unsure(str(e)) from None
        try:
            outcome = self.backend.parse_append_reply(replies[0])
        except BackendError:
            outcome = None
        if outcome is None or any(isinstance(r, Exception) for r in replies[1:]):
            raise Unsure(f"append replied {replies!r}"[:200])
        return outcome

    async def take(self, key: str, *also_delete: str) -> bytes | None:
        """The backend's temp_take: GET key, DEL key and `also_delete`. Not retried."""
        packed = self.backend.pack_take(key, *also_delete)
        got, deleted = await self.execute(packed, 2, what="temp_get+delete")
        for r in (got, deleted):
            if isinstance(r, Exception):
                raise BackendError(f"Redis at {self.backend.url} refused temp_get+delete: {r}")
        return got

    async def delete(self, *keys: str) -> int:
        """The backend's temp_delete (one DEL)."""
        (n,) = await self.execute(self.backend.pack_delete(*keys), 1, what="temp_delete")
        if isinstance(n, Exception):
            raise BackendError(f"Redis at {self.backend.url} refused temp_delete: {n}")
        return int(n)

    async def execute(self, packed: bytes, count: int, *, what: str = "command") -> list[Any]:
        """Send packed commands (with the next group of writes) and return their `count` replies,
        error replies in place. Raises BackendUnavailable if the connection fails or stalls."""
        if self._closed:
            raise BackendUnavailable(f"the redis pipe to {self.backend.url} is closed ({what})")
        if self._transport is None:
            await self._connect(what)
        loop = asyncio.get_running_loop()
        request = _Request(loop.create_future(), count)
        if not self._waiting:
            self._progress = time.monotonic()
        self._waiting.append(request)
        self._out.append(packed)
        self.commands += count
        if not self._flush_pending:
            self._flush_pending = True
            loop.call_soon(self._flush)
        if self._timer is None:
            self._timer = loop.call_later(self._timeout, self._check_overdue)
        try:
            return await request.future
        except (ConnectionError, OSError, asyncio.TimeoutError) as e:
            raise BackendUnavailable(f"Redis at {self.backend.url} is unavailable: {what} failed after 1 "
                                     f"attempt(s) ({type(e).__name__}: {self.backend.scrub(e)})") from None

    # -- connection -----------------------------------------------------------------------------------
    async def _connect(self, what: str) -> None:
        if self._connecting is not None:
            try:
                await asyncio.shield(self._connecting)
            except BackendError:
                raise
            except Exception as e:  # noqa: BLE001 - mapped as below
                raise BackendUnavailable(f"Redis at {self.backend.url} is unavailable: {what} could not "
                                         f"connect ({type(e).__name__}: {self.backend.scrub(e)})") from None
            return
        loop = asyncio.get_running_loop()
        self._connecting = loop.create_future()
        try:
            await asyncio.wait_for(self._open(), self._connect_timeout + self._timeout)
            self._connecting.set_result(None)
        except BaseException as e:  # noqa: BLE001 - handed to every waiter, then mapped
            error = e if isinstance(e, (ConnectionError, OSError, asyncio.TimeoutError, BackendError)) \
                else ConnectionError(str(e))
            self._fail(error)
            self._connecting.set_exception(error)
            self._connecting.exception()  # retrieved: waiters re-raise it themselves
            if isinstance(error, BackendError):
                raise
            raise BackendUnavailable(f"Redis at {self.backend.url} is unavailable: {what} could not connect "
                                     f"({type(error).__name__}: {self.backend.scrub(error)})") from None
        finally:
            self._connecting = None

    async def _open(self) -> None:
        loop = asyncio.get_running_loop()
        if self._path:
            transport, protocol = await loop.create_unix_connection(lambda: _Protocol(self), self._path)
        else:
            transport, protocol = await loop.create_connection(lambda: _Protocol(self), self._host or "localhost", self._port)
        self._transport, self._protocol = transport, protocol
        self._parser = RespParser()
        # The handshake the pooled connections make: AUTH, CLIENT SETNAME, SELECT.
        hello: list[tuple[Any, ...]] = []
        if self._password is not None:
            hello.append(("AUTH", self._username, self._password) if self._username else ("AUTH", self._password))
        if self._client_name:
            hello.append(("CLIENT", "SETNAME", self._client_name))
        if self._db:
            hello.append(("SELECT", self._db))
        if not hello:
            return
        request = _Request(loop.create_future(), len(hello))
        self._waiting.appendleft(request)
        transport.write(self.backend.pack_commands(hello))
        for reply in await request.future:
            if isinstance(reply, Exception):
                raise BackendUnavailable(f"Redis at {self.backend.url} refused the connection handshake of "
                                         f"user {self._username or 'default'!r}: {self.backend.scrub(reply)}")

    def _flush(self) -> None:
        self._flush_pending = False
        if not self._out:
            return
        data = b"".join(self._out) if len(self._out) > 1 else self._out[0]
        self._out = []
        if self._transport is None:
            self._fail(ConnectionError("connection lost"))
            return
        self.writes += 1
        self._transport.write(data)

    def _on_data(self, protocol: _Protocol, data: bytes) -> None:
        if protocol is not self._protocol:
            return
        parser = self._parser
        parser.feed(data)
        waiting = self._waiting
        self._progress = time.monotonic()
        try:
            while waiting:
                ok, reply = parser.pop()
                if not ok:
                    break
                request = waiting[0]
                request.replies.append(reply)
                if len(request.replies) == request.count:
                    waiting.popleft()
                    if not request.future.done():
                        request.future.set_result(request.replies)
        except BackendError as e:  # a reply we cannot read: the stream is out of step
            self._fail(ConnectionError(str(e)))
            return
        parser.compact()

    def _on_lost(self, protocol: _Protocol, exc: Exception | None) -> None:
        if protocol is self._protocol:
            self._fail(exc if exc is not None else ConnectionError("connection closed by the server"))

    def _check_overdue(self) -> None:
        self._timer = None
        if not self._waiting:
            return
        late = time.monotonic() - self._progress
        if late >= self._timeout:
            self._fail(asyncio.TimeoutError(f"no reply within {self._timeout:g} s"))
            return
        self._timer = asyncio.get_running_loop().call_later(self._timeout - late, self._check_overdue)

    def _fail(self, error: BaseException) -> None:
        """Drop the connection; every command waiting for a reply gets `error`."""
        transport, self._transport, self._protocol = self._transport, None, None
        if transport is not None:
            transport.abort()
        waiting, self._waiting = self._waiting, collections.deque()
        self._out = []
        for request in waiting:
            if not request.future.done():
                request.future.set_exception(error)
                request.future.exception()  # retrieved: a handshake nobody awaits any more must not warn

    def close(self) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._fail(ConnectionError("the redis pipe was closed"))


class DirectConnection:
    """One blocking connection owned by one thread, for a worker's hot loop (RedisBackend's
    `use_direct_connection`): packed commands out in one sendall, replies read with RespParser.

    What it saves per round trip against a pooled redis-py connection: the pool's locks and
    queue, its liveness poll (a select() per checkout) and its metrics bookkeeping, about 60 us of
    a worker's CPU each time. Errors are redis-py's: ConnectionError / TimeoutError (the connection is
    dropped and the next call reconnects; the backend's retry policy decides what happens next), error
    replies in place like RedisBackend._pipeline's, other error replies (AUTH, ...) raised."""

    def __init__(self, kwargs: dict[str, Any], *, socket_timeout: float, connect_timeout: float,
                 pack: Any) -> None:
        self._kw = kwargs
        self._timeout = socket_timeout
        self._connect_timeout = connect_timeout
        self._pack = pack
        self._sock: socket.socket | None = None
        self._parser = RespParser()
        self.round_trips = 0

    def _connect(self) -> socket.socket:
        kw = self._kw
        try:
            if kw.get("path"):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(self._connect_timeout)
                sock.connect(kw["path"])
            else:
                sock = socket.create_connection((kw.get("host") or "localhost", int(kw.get("port") or 6379)),
                                                timeout=self._connect_timeout)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            sock.settimeout(self._timeout)
        except socket.timeout as e:
            raise RedisTimeoutError(f"Timeout connecting to server: {e}") from None
        except OSError as e:
            raise RedisConnectionError(f"Error connecting to the server: {e}") from None
        self._sock = sock
        self._parser = RespParser()
        hello: list[tuple[Any, ...]] = []
        if kw.get("password") is not None:
            hello.append(("AUTH", kw["username"], kw["password"]) if kw.get("username") else ("AUTH", kw["password"]))
        if kw.get("client_name"):
            hello.append(("CLIENT", "SETNAME", kw["client_name"]))
        if kw.get("db"):
            hello.append(("SELECT", kw["db"]))
        if hello:
            for reply in self._exchange(self._pack(hello), len(hello), 0):
                if isinstance(reply, Exception):
                    self.disconnect()
                    raise reply
        return sock

    def pipeline(self, packed: bytes, count: int, *, best_effort_tail: int = 0) -> list[Any]:
        """RedisBackend._pipeline's contract on this connection."""
        if self._sock is None:
            self._connect()
        self.round_trips += 1
        return self._exchange(packed, count, best_effort_tail)

    def _exchange(self, packed: bytes, count: int, best_effort_tail: int) -> list[Any]:
        sock, parser = self._sock, self._parser
        assert sock is not None
        out: list[Any] = []
        try:
            sock.sendall(packed)
            while len(out) < count:
                ok, reply = parser.pop()
                if ok:
                    if isinstance(reply, Exception) and not isinstance(reply, ResponseError):
                        raise reply  # e.g. an AuthenticationError, as redis-py raises it
                    out.append(reply)
                    continue
                parser.compact()
                data = sock.recv(65536)
                if not data:
                    raise RedisConnectionError("Connection closed by server.")
                parser.feed(data)
        except (socket.timeout, RedisTimeoutError) as e:
            self.disconnect()
            error: Exception = RedisTimeoutError(f"Timeout reading from socket: {e}")
            if len(out) < count - best_effort_tail:
                raise error from None
            out.extend([error] * (count - len(out)))
        except (OSError, RedisConnectionError, BackendError) as e:
            self.disconnect()
            error = e if isinstance(e, RedisConnectionError) else RedisConnectionError(f"Error while talking to the server: {e}")
            if len(out) < count - best_effort_tail:
                raise error from None
            out.extend([error] * (count - len(out)))
        except BaseException:
            self.disconnect()
            raise
        parser.compact()
        return out

    def disconnect(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass
