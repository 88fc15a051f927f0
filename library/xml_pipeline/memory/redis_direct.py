"""DirectConnection: one blocking connection owned by one thread, for a worker's hot loop.

RedisBackend's `use_direct_connection` / `new_direct_connection` hand it out. Packed commands go
out in one sendall (a large argument in one of its own, not copied) and the replies are read with
hiredis (redis_wire.py). What it saves per round trip against a pooled redis-py connection: the
pool's locks and queue, its liveness poll (a select() per checkout) and its metrics bookkeeping,
about 60 us of a worker's CPU each time.

Replies are received into one reusable buffer of RECV_BYTES and fed to hiredis from there, without
a new bytes object per read. Reading a 1 MB slot (LINDEX) this way costs ~0.20 ms of CPU against
~0.30 ms through a pooled redis-py connection; 128 and 256 KiB buffers measured slower (~0.54 ms:
hiredis's own buffer grows differently), 1 MiB the same as 64 KiB.

Plain TCP, a unix socket or TLS (rediss://, with the SSLContext redis-py would build for the same
settings: redis_wire.tls_context); the handshake is redis_wire.handshake's.
"""
from __future__ import annotations

import socket
import ssl
from collections.abc import Callable
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import InvalidResponse, ReadOnlyError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .redis_wire import MORE, Packed, handshake, pack_commands, reply_reader, send_packed, tls_context

__all__ = ["DirectConnection", "RECV_BYTES"]

#: The receive buffer of a connection (one per worker thread; see above for the size).
RECV_BYTES = 64 * 1024


class DirectConnection:
    """One blocking connection for one thread. Errors are redis-py's: ConnectionError /
    TimeoutError (the connection is dropped and the next call reconnects; the backend's retry
    policy decides what happens next), error replies in place like RedisBackend._pipeline's, other
    error replies (AUTH, ...) raised.

    `kwargs` are the backend's connection_kwargs(): host/port or path, db, username, password,
    client_name, and `tls` with the ssl_* settings."""

    def __init__(self, kwargs: dict[str, Any], *, socket_timeout: float, connect_timeout: float,
                 refresh: Callable[[], dict[str, Any]] | None = None) -> None:
        self._kw = kwargs
        #: Where the server is may change (Sentinel): asked again before each reconnection.
        self._refresh = refresh
        self._timeout = socket_timeout
        self._connect_timeout = connect_timeout
        self._tls: ssl.SSLContext | None = tls_context(kwargs) if kwargs.get("tls") else None
        self._sock: socket.socket | None = None
        self._reader = reply_reader()
        self._buffer: memoryview | None = None
        self.round_trips = 0

    def _connect(self) -> socket.socket:
        if self._refresh is not None:
            self._kw = self._refresh()
            if not self._kw.get("host"):  # no sentinel answered: a connection error, retried as such
                raise RedisConnectionError("Error connecting: no sentinel named the master")
        kw = self._kw
        host = kw.get("host") or "localhost"
        sock: socket.socket | None = None
        try:
            if kw.get("path"):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(self._connect_timeout)
                sock.connect(kw["path"])
            else:
                sock = socket.create_connection((host, int(kw.get("port") or 6379)), timeout=self._connect_timeout)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            if self._tls is not None:
                sock = self._tls.wrap_socket(sock, server_hostname=host)  # handshake within connect_timeout
            sock.settimeout(self._timeout)
        except socket.timeout as e:
            if sock is not None:
                sock.close()
            raise RedisTimeoutError(f"Timeout connecting to server: {e}") from None
        except OSError as e:  # ssl.SSLError (a certificate that does not verify, ...) included
            if sock is not None:
                sock.close()
            raise RedisConnectionError(f"Error connecting to the server: {e}") from None
        self._sock = sock
        self._reader = reply_reader()
        hello = handshake(kw)
        if hello:
            for reply in self._exchange(pack_commands(hello), len(hello), 0):
                if isinstance(reply, Exception):
                    self.disconnect()
                    raise reply
        return sock

    def pipeline(self, packed: Packed, count: int, *, best_effort_tail: int = 0) -> list[Any]:
        """RedisBackend._pipeline's contract on this connection."""
        if self._sock is None:
            self._connect()
        self.round_trips += 1
        return self._exchange(packed, count, best_effort_tail)

    def _exchange(self, packed: Packed, count: int, best_effort_tail: int) -> list[Any]:
        sock, reader = self._sock, self._reader
        assert sock is not None
        out: list[Any] = []
        buffer = self._buffer
        if buffer is None:
            buffer = self._buffer = memoryview(bytearray(RECV_BYTES))
        try:
            send_packed(sock, packed)
            while len(out) < count:
                reply = reader.gets()
                if reply is not MORE:
                    if isinstance(reply, Exception) and not isinstance(reply, ResponseError):
                        raise reply  # e.g. an AuthenticationError, as redis-py raises it
                    if isinstance(reply, ReadOnlyError) and self._refresh is not None:
                        # A demoted master (after a Sentinel failover): as redis-py's sentinel
                        # connections do, a connection error, so the next attempt reconnects to
                        # the new master.
                        raise RedisConnectionError(f"the master was demoted to a replica: {reply}")
                    out.append(reply)
                    continue
                n = sock.recv_into(buffer)
                if not n:
                    raise RedisConnectionError("Connection closed by server.")
                reader.feed(buffer, 0, n)
        except (socket.timeout, RedisTimeoutError) as e:
            self.disconnect()
            error: Exception = RedisTimeoutError(f"Timeout reading from socket: {e}")
            if len(out) < count - best_effort_tail:
                raise error from None
            out.extend([error] * (count - len(out)))
        except (OSError, RedisConnectionError, InvalidResponse) as e:
            self.disconnect()
            error = e if isinstance(e, RedisConnectionError) else RedisConnectionError(f"Error while talking to the server: {e}")
            if len(out) < count - best_effort_tail:
                raise error from None
            out.extend([error] * (count - len(out)))
        except BaseException:
            self.disconnect()
            raise
        return out

    def disconnect(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass
