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

Supported: redis://, rediss:// (TLS with the SSLContext redis-py would build for the same settings,
redis_wire.tls_context) and unix:// URLs, and the master a Sentinel set names (redis+sentinel://:
asked again on every connection, and a connection that meets a demoted master is dropped). On a
Redis Cluster for_backend returns None: the store uses one RedisPipe per master instead, each made
with `address=` (redis_cluster_pipe.ClusterPipe). Replies are read by hiredis and the connection handshake
is redis_wire.handshake's. A reply overdue by socket_timeout fails every waiting command (the
connection is dropped; the next command reconnects), so nothing waits forever on a dead server.
"""
from __future__ import annotations

import asyncio
import collections
import ssl
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from redis.exceptions import InvalidResponse, ReadOnlyError

from ..errors import BackendError, BackendUnavailable
from .protocol import Appended
from .redis_wire import MORE, Packed, handshake, pack_commands, pieces, reply_reader, tls_context

if TYPE_CHECKING:
    from .redis_backend import RedisBackend

__all__ = ["RedisPipe", "Unsure"]


class Unsure(Exception):
    """The fast path has no plain answer: redo the operation through the blocking backend."""


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

    def __init__(self, backend: "RedisBackend", *, address: tuple[str, int] | None = None) -> None:
        """`address`: the (host, port) of one node of a Redis Cluster (redis_cluster_pipe.py), with
        the backend's credentials and TLS settings; None: the backend's server."""
        self.backend = backend
        kw = backend.connection_kwargs()
        if address is not None:
            kw.update(host=address[0], port=address[1], path=None)
        self._host: str | None = kw.get("host")
        self._port: int = int(kw.get("port") or 6379)
        self._path: str | None = kw.get("path")
        self._fixed = address is not None
        self._username: str | None = kw.get("username")
        self._handshake = handshake(kw)
        self._tls: ssl.SSLContext | None = tls_context(kw) if kw.get("tls") else None
        self._timeout = float(backend.config.socket_timeout)
        self._connect_timeout = float(backend.config.connect_timeout)
        self._transport: asyncio.Transport | None = None
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Future[None] | None = None
        self._reader = reply_reader()
        self._waiting: collections.deque[_Request] = collections.deque()
        self._out: list[Any] = []
        self._pieces = False  # _out holds a large piece (a memoryview): written piece by piece
        self._flush_pending = False
        self._timer: asyncio.TimerHandle | None = None
        self._progress = 0.0
        self._closed = False
        #: The connection that met a demoted master (READONLY), until it is dropped.
        self._demoted: _Protocol | None = None
        #: Writes sent and commands carried (tests count them: group commit means writes < commands).
        self.writes = 0
        self.commands = 0

    @classmethod
    def for_backend(cls, backend: Any) -> "RedisPipe | None":
        """A pipe for a RedisBackend whose connections it can make (redis://, rediss://, unix://);
        None otherwise (keep the blocking path)."""
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

    async def execute(self, packed: Packed, count: int, *, what: str = "command") -> list[Any]:
        """Send packed commands (with the next group of writes) and return their `count` replies,
        error replies in place. Raises BackendUnavailable if the connection fails or stalls."""
        if self._closed:
            raise BackendUnavailable(f"the redis pipe to {self.backend.url} is closed ({what})")
        if self._demoted is not None:
            await self._leave_demoted()
        if self._transport is None:
            await self._connect(what)
        loop = asyncio.get_running_loop()
        request = _Request(loop.create_future(), count)
        if not self._waiting:
            self._progress = time.monotonic()
        self._waiting.append(request)
        if type(packed) is list:
            self._out += packed
            self._pieces = True
        else:
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

    async def connect(self, what: str = "connect") -> None:
        """Make sure the connection is up (connect now if it is not): BackendUnavailable if it cannot
        be made, before anything is sent."""
        if self._closed:
            raise BackendUnavailable(f"the redis pipe to {self.backend.url} is closed ({what})")
        if self._transport is None:
            await self._connect(what)

    async def _leave_demoted(self) -> None:
        """After a READONLY reply: let the commands already sent on that connection have their
        replies (they stand as they are), then drop it, so the next command reconnects to the
        master the sentinels name now. Nothing new is sent to the demoted server meanwhile."""
        demoted = self._demoted
        deadline = time.monotonic() + self._timeout
        while demoted is self._protocol and self._waiting and time.monotonic() < deadline:
            await asyncio.sleep(0.001)
        if self._demoted is demoted:
            self._demoted = None
            if demoted is self._protocol:
                self._fail(ConnectionError("the master was demoted to a replica"))

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
        if self.backend.config.redis_mode == "sentinel" and not self._fixed:
            # The master may have changed since the last connection: ask the sentinels again
            # (blocking calls, off the loop).
            kw = await loop.run_in_executor(None, self.backend.connection_kwargs)
            if not kw.get("host"):
                raise ConnectionError("no sentinel named the master")
            self._host, self._port = kw.get("host"), int(kw.get("port") or 6379)
        if self._path:
            transport, protocol = await loop.create_unix_connection(lambda: _Protocol(self), self._path)
        else:
            host = self._host or "localhost"
            transport, protocol = await loop.create_connection(
                lambda: _Protocol(self), host, self._port, ssl=self._tls,
                server_hostname=host if self._tls is not None else None,
                ssl_handshake_timeout=self._connect_timeout if self._tls is not None else None)
        self._transport, self._protocol = transport, protocol
        self._reader = reply_reader()
        hello = self._handshake
        if not hello:
            return
        request = _Request(loop.create_future(), len(hello))
        self._waiting.appendleft(request)
        transport.write(pack_commands(hello))
        for reply in await request.future:
            if isinstance(reply, Exception):
                raise BackendUnavailable(f"Redis at {self.backend.url} refused the connection handshake of "
                                         f"user {self._username or 'default'!r}: {self.backend.scrub(reply)}")

    def _flush(self) -> None:
        self._flush_pending = False
        if not self._out:
            return
        out, self._out = self._out, []
        transport = self._transport
        if transport is None:
            self._fail(ConnectionError("connection lost"))
            return
        self.writes += 1
        if self._pieces:
            # Large values are written from their own buffers: the transport sends what the socket
            # takes at once and keeps only the rest (a memoryview slice, copied once into its buffer).
            self._pieces = False
            for piece in pieces(out):
                transport.write(piece)
        else:
            transport.write(b"".join(out) if len(out) > 1 else out[0])

    def _on_data(self, protocol: _Protocol, data: bytes) -> None:
        if protocol is not self._protocol:
            return
        reader = self._reader
        reader.feed(data)
        waiting = self._waiting
        self._progress = time.monotonic()
        try:
            while waiting:
                reply = reader.gets()
                if reply is MORE:
                    break
                if type(reply) is ReadOnlyError:
                    # A demoted master (Sentinel failover): this reply stands, the connection is
                    # dropped before the next command so that it reconnects to the new master.
                    self._demoted = protocol
                request = waiting[0]
                request.replies.append(reply)
                if len(request.replies) == request.count:
                    waiting.popleft()
                    if not request.future.done():
                        request.future.set_result(request.replies)
        except InvalidResponse as e:  # not RESP: the stream is out of step
            self._fail(ConnectionError(f"unreadable reply from Redis: {e}"))

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
        self._pieces = False
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
