"""ManagerBackend: data shared between the processes of one machine through a multiprocessing server.

The design, and why:

- ONE object lives in the server (manager_server.py): an InMemoryBackend, so the TTL emulation,
  atomic index, dedup and slot limit are the same code as the memory backend.
- ONE round trip per operation: the client speaks the manager server's own wire protocol directly
  (send `(id, method, args, kwargs)`, receive `('#RETURN', result)`) on a per-thread connection. No
  lock proxies: atomicity comes from the server object's lock, held for the whole operation.
- Bounded waits: client sockets carry SO_RCVTIMEO/SO_SNDTIMEO (`socket_timeout`) and a connect
  timeout, so a dead server gives BackendUnavailable at once (refused / EOF) and a hung one after
  `socket_timeout` seconds, never a hang. Reads and idempotent writes are retried once on a fresh
  connection (this is what makes a client survive a server restart); a plain append is not, because
  repeating it could store the slot twice.
- Addresses: `manager_address` is `127.0.0.1:PORT` / `localhost:PORT` or a Unix socket path, always
  with `manager_authkey` (multiprocessing's HMAC challenge in both directions). Without an address the
  backend starts a private server on a Unix socket in a private temp dir, with a random authkey,
  and exposes `address`/`authkey`/`client_config()` so other processes can connect. The backend
  pickles as (address, authkey, config): a spawned child that receives it reconnects lazily.
- The signing key: the server hands its key ring to every client over the authenticated connection.
  It is the configured key, else one derived from the authkey (HMAC), so a restarted server with the
  same authkey signs and verifies with the same key.
- A server this backend starts is a fresh interpreter that stops when its owner closes the backend
  or dies. Clients work in processes made by spawn, forkserver or fork (a forked child opens its
  own sockets).
"""
from __future__ import annotations

import ipaddress
import multiprocessing
import os
import socket
import subprocess
import tempfile
import threading
import weakref
from collections.abc import Callable, Sequence
from multiprocessing import connection as mpc
from types import TracebackType
from typing import Any

from ..errors import BackendError, BackendUnavailable, ConfigError
from . import manager_server
from .config import BackendConfig, compat_config
from .manager_io import BufferedConnection
from .manager_server import PROTOCOL, STORE_ID, Address, derive_manager_signer, tune_socket
from .protocol import Appended
from .signing import Signer

__all__ = ["ManagerBackend", "derive_manager_signer", "format_address", "parse_address"]

_NO_KWARGS: dict[str, Any] = {}
#: One append of buffer_append_many: (thread, slot, index, max_slots, append_id, temp items).
AppendCall = tuple[str, bytes, int, int | None, str | None, list[tuple[str, bytes]]]
_ADDRESS_FIELD = "backend.manager_address"
_ADDRESS_ALLOWED = "'127.0.0.1:PORT', 'localhost:PORT' or an absolute Unix socket path ('/run/xp.sock', 'unix:///run/xp.sock')"

#: Operations that may be repeated without changing the outcome: retried once on a fresh
#: connection when the old one turns out to be dead (e.g. after a server restart).
_IDEMPOTENT = frozenset({
    "hello", "info", "buffer_get_thread", "buffer_get_slot", "buffer_thread_len", "buffer_thread_exists",
    "buffer_list_threads", "registry_set", "registry_get_or_create", "registry_get_uuid",
    "registry_get_chain", "registry_list_all", "temp_put", "temp_get", "temp_put_many", "temp_get_many",
})


# ---------------------------------------------------------------------------------------------
# Addresses and keys
# ---------------------------------------------------------------------------------------------
def parse_address(value: object) -> Address:
    """'127.0.0.1:5000' → ('127.0.0.1', 5000); '/run/xp.sock' or 'unix:///run/xp.sock' → the path.

    Only loopback TCP or Unix sockets: the manager protocol is pickle, fine between the processes
    of one machine, not something to expose on a network.
    """
    if not isinstance(value, str) or not value:
        raise ConfigError(_ADDRESS_FIELD, f"must be a non-empty string, got {value!r}", _ADDRESS_ALLOWED)
    if value.startswith("unix://"):
        value = value[len("unix://"):]
    if value.startswith("/"):
        if len(os.fsencode(value)) > 107:
            raise ConfigError(_ADDRESS_FIELD, f"Unix socket path {value!r} is longer than 107 bytes", _ADDRESS_ALLOWED)
        return value
    host, sep, port_text = value.rpartition(":")
    if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
        raise ConfigError(_ADDRESS_FIELD, f"{value!r} is not host:port or a socket path", _ADDRESS_ALLOWED)
    if host == "localhost":
        host = "127.0.0.1"
    try:
        loopback = ipaddress.IPv4Address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ConfigError(_ADDRESS_FIELD, f"host {host!r} is not a loopback IPv4 address", _ADDRESS_ALLOWED)
    return (host, int(port_text))


def format_address(address: Address) -> str:
    return address if isinstance(address, str) else f"{address[0]}:{address[1]}"


def _authkey_bytes(value: str | bytes) -> bytes:
    key = value.encode() if isinstance(value, str) else bytes(value)
    if len(key) < 16:
        raise ConfigError("backend.manager_authkey", f"is {len(key)} bytes long, at least 16 are required",
                          "a random secret of 16 or more characters shared by the server and its clients")
    return key


_CLOSE_LOCK = threading.Lock()


class _Connection(BufferedConnection):
    """A Connection whose fd is closed exactly once, whichever thread gets there first (and whose
    messages skip the stdlib's copies of large slots, manager_io.py).

    close() may run in the owner's thread while another thread's connection is being finalized
    (CPython calls __del__ before it clears weak references, so the WeakSet in ManagerBackend can
    still hand the object out). Without this, both os.close() the same fd number: one raises EBADF,
    and worse, the second close could hit an fd the process has reused meanwhile.
    """

    def _close(self, _close: Callable[[int], None] = os.close) -> None:
        with _CLOSE_LOCK:
            handle, self._handle = self._handle, None  # type: ignore[has-type]
        if handle is not None:
            _close(handle)


# ---------------------------------------------------------------------------------------------
# Client side
# ---------------------------------------------------------------------------------------------
class ManagerBackend:
    """Shared backend served by a multiprocessing manager process on this machine."""

    def __init__(self, config: BackendConfig | str | tuple[str, int] | None = None,
                 authkey: str | bytes | None = None, *, address: str | tuple[str, int] | None = None,
                 start_server: bool = False) -> None:
        """Connect to the server at `address` (or `config.manager_address`), or start one.

        xml-pipeline's form works too: `ManagerBackend()`, `ManagerBackend(address, authkey)` with
        `address` a (host, port) tuple or text.

        No address: start a private server (Unix socket in a private temp dir, random authkey
        unless one is configured). `start_server=True` with an address: start the server bound at
        that address (port 0 picks a free port; `address` tells which). A server this backend
        started stops when the backend is closed or its process exits.
        """
        self.config = compat_config(config, "manager")
        if isinstance(address, tuple):
            address = f"{address[0]}:{address[1]}"
        text = address if address is not None else self.config.manager_address
        raw_key = authkey if authkey is not None else self.config.manager_authkey
        self._server: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize | None = None
        if text is None:
            key = _authkey_bytes(raw_key) if raw_key is not None else os.urandom(32)
            private_dir = tempfile.mkdtemp(prefix="xp-manager-")  # mode 0700: only this user connects
            self._init_client(self._start(os.path.join(private_dir, "store.sock"), key, (private_dir,)), key)
        else:
            addr = parse_address(text)
            if raw_key is None:
                raise ConfigError("backend.manager_authkey", "is required when backend.manager_address is set",
                                  "a random secret of 16 or more characters shared by the server and its clients")
            key = _authkey_bytes(raw_key)
            if start_server:
                addr = self._start(addr, key, (addr,) if isinstance(addr, str) else ())
            self._init_client(addr, key)
        try:
            self._handshake()
        except BaseException:
            self.close()
            raise

    # -- construction ---------------------------------------------------------------------------
    def _start(self, address: Address, authkey: bytes, cleanup: tuple[str, ...]) -> Address:
        self._server, self._finalizer, bound = manager_server.start_server(
            self, address, authkey, self.config, cleanup, format_address(address))
        return bound

    def _init_client(self, address: Address, authkey: bytes) -> None:
        self._address = address
        self._authkey = authkey
        self._timeout = float(self.config.socket_timeout)
        self._connect_timeout = float(self.config.connect_timeout)
        self._closed = False
        self._signer: Signer | None = None
        self._server_ttl: int | None = None
        self._reset_connections()

    def _reset_connections(self) -> None:
        self._pid = os.getpid()
        self._local = threading.local()
        self._conns: weakref.WeakSet[mpc.Connection] = weakref.WeakSet()
        self._conns_lock = threading.Lock()

    def _handshake(self) -> None:
        hello = self._call("hello", ())
        if hello.get("protocol") != PROTOCOL:
            raise BackendError(f"manager server at {self.address} speaks protocol {hello.get('protocol')}, "
                               f"this client speaks {PROTOCOL}")
        self._signer = Signer(tuple(hello["keys"]))
        self._server_ttl = hello.get("ttl")

    # -- pickling: a child gets (address, authkey, config) and reconnects on first use --------------
    def __reduce__(self) -> tuple[Any, ...]:
        return (_attach, (self._address, self._authkey, self.config))

    # -- public properties ----------------------------------------------------------------------
    @property
    def is_shared(self) -> bool:
        return True

    @property
    def address(self) -> str:
        """Where the server listens: 'host:port' or a Unix socket path."""
        return format_address(self._address)

    @property
    def authkey(self) -> bytes:
        return self._authkey

    @property
    def owns_server(self) -> bool:
        return self._server is not None

    @property
    def slot_namespace(self) -> str:
        return "manager"

    @property
    def signer(self) -> Signer:
        if self._signer is None:
            self._handshake()
        assert self._signer is not None
        return self._signer

    @property
    def ttl(self) -> int | None:
        """The TTL the server applies (the server's configuration decides)."""
        if self._signer is None:
            self._handshake()
        return self._server_ttl

    def client_config(self) -> BackendConfig:
        """A config other processes can use to connect to this server (contains the authkey)."""
        return self.config.replace(backend_type="manager", manager_address=self.address,
                                   manager_authkey=self._authkey)

    # -- the one round trip ----------------------------------------------------------------------
    def _open(self) -> mpc.Connection:
        family = socket.AF_UNIX if isinstance(self._address, str) else socket.AF_INET
        sock = socket.socket(family)
        try:
            sock.settimeout(self._connect_timeout)
            sock.connect(self._address)
            sock.setblocking(True)
            conn = _Connection(sock.detach())
        except OSError as e:
            sock.close()
            raise self._unavailable(e) from e
        try:
            tune_socket(conn.fileno(), self._timeout)
            mpc.answer_challenge(conn, self._authkey)
            mpc.deliver_challenge(conn, self._authkey)
            conn.send((None, "accept_connection", (f"xp-client-{os.getpid()}",), _NO_KWARGS))
            kind, result = conn.recv()
            if kind != "#RETURN":
                raise BackendError(f"manager server at {self.address} refused the connection: {result}")
        except multiprocessing.AuthenticationError as e:
            conn.close()
            raise BackendUnavailable(f"manager server at {self.address} rejected the authkey "
                                     "(check backend.manager_authkey)") from e
        except (OSError, EOFError) as e:
            conn.close()
            raise self._unavailable(e) from e
        with self._conns_lock:
            self._conns.add(conn)
        return conn

    def _unavailable(self, e: BaseException) -> BackendUnavailable:
        if isinstance(e, (BlockingIOError, TimeoutError, socket.timeout)):
            why = f"no answer within {self._timeout:g} s"
        elif isinstance(e, EOFError):
            why = "the server closed the connection"
        else:
            why = f"{type(e).__name__}: {e}"
        return BackendUnavailable(f"manager server at {self.address} is unavailable ({why})")

    def _call(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any] = _NO_KWARGS) -> Any:
        if self._closed:
            raise BackendUnavailable(f"manager backend for {self.address} is closed")
        if self._pid != os.getpid():  # forked: never share the parent's sockets
            self._reset_connections()
        conn: mpc.Connection | None = getattr(self._local, "conn", None)
        reused = conn is not None
        if conn is None:
            conn = self._local.conn = self._open()
        try:
            conn.send((STORE_ID, method, args, kwargs))
            kind, result = conn.recv()
        except (OSError, EOFError) as e:
            self._local.conn = None
            conn.close()
            if reused and method in _IDEMPOTENT:
                return self._call(method, args, kwargs)  # fresh connection, once (reused is now False)
            raise self._unavailable(e) from e
        if kind == "#RETURN":
            return result
        if kind == "#ERROR":
            raise result
        raise BackendError(f"manager server at {self.address} failed on {method}: {result}")

    # -- Context Buffer -------------------------------------------------------------------------
    def buffer_append(self, thread_id: str, slot_data: bytes, *, max_slots: int | None = None,
                      append_id: str | None = None) -> int:
        kwargs = _NO_KWARGS if max_slots is None and append_id is None else \
            {"max_slots": max_slots, "append_id": append_id}
        if append_id is not None:
            # With an id a repeat stores nothing, so a retry on a fresh connection is safe.
            try:
                return int(self._call("buffer_append", (thread_id, slot_data), kwargs))
            except BackendUnavailable:
                return int(self._call("buffer_append", (thread_id, slot_data), kwargs))
        return int(self._call("buffer_append", (thread_id, slot_data), kwargs))

    def buffer_append_at(self, thread_id: str, slot: bytes, index: int, *, max_slots: int | None = None,
                         append_id: str | None = None, items: Sequence[tuple[str, bytes]] = ()) -> Appended:
        """The server store's compare-and-append (and temp_put of `items`) in one round trip."""
        kwargs = {"max_slots": max_slots, "append_id": append_id, "items": list(items)}
        if append_id is not None:
            # With an id a repeat stores nothing (it answers "repeat" with the stored slot) and the
            # puts overwrite: safe to retry on a fresh connection.
            try:
                return Appended(*self._call("buffer_append_at", (thread_id, slot, index), kwargs))
            except BackendUnavailable:
                pass
        return Appended(*self._call("buffer_append_at", (thread_id, slot, index), kwargs))

    def buffer_append_many(self, calls: Sequence[AppendCall]) -> list[Appended | Exception]:
        """buffer_append_at of each (thread, slot, index, max_slots, append_id, items), in order, in
        one round trip (the pump's group commit, manager_store.py): each call's Appended, or the
        exception it raised (ThreadFullError, ValueError, ...), in its place."""
        calls = list(calls)
        if all(c[4] is not None for c in calls):
            # Every append has an id: a repeat stores nothing and the puts overwrite, so a retry on
            # a fresh connection is safe (as for buffer_append_at).
            try:
                return self._call("buffer_append_many", (calls,))
            except BackendUnavailable:
                pass
        return self._call("buffer_append_many", (calls,))

    def buffer_get_thread(self, thread_id: str) -> list[bytes]:
        return self._call("buffer_get_thread", (thread_id,))

    def buffer_get_slot(self, thread_id: str, index: int) -> bytes | None:
        return self._call("buffer_get_slot", (thread_id, index))

    def buffer_thread_len(self, thread_id: str) -> int:
        return int(self._call("buffer_thread_len", (thread_id,)))

    def buffer_thread_exists(self, thread_id: str) -> bool:
        return bool(self._call("buffer_thread_exists", (thread_id,)))

    def buffer_delete_thread(self, thread_id: str) -> bool:
        return bool(self._call("buffer_delete_thread", (thread_id,)))

    def buffer_list_threads(self) -> list[str]:
        return self._call("buffer_list_threads", ())

    def buffer_clear(self) -> int:
        return int(self._call("buffer_clear", ()))

    # -- Thread Registry ------------------------------------------------------------------------
    def registry_set(self, chain: str, uuid: str) -> None:
        self._call("registry_set", (chain, uuid))

    def registry_get_or_create(self, chain: str, uuid: str) -> str:
        return self._call("registry_get_or_create", (chain, uuid))

    def registry_get_uuid(self, chain: str) -> str | None:
        return self._call("registry_get_uuid", (chain,))

    def registry_get_chain(self, uuid: str) -> str | None:
        return self._call("registry_get_chain", (uuid,))

    def registry_delete(self, uuid: str) -> bool:
        return bool(self._call("registry_delete", (uuid,)))

    def registry_list_all(self) -> dict[str, str]:
        return self._call("registry_list_all", ())

    def registry_clear(self) -> int:
        return int(self._call("registry_clear", ()))

    # -- Temporary data -------------------------------------------------------------------------
    def temp_put(self, key: str, data: bytes, *, ttl: int | None = None) -> None:
        self._call("temp_put", (key, data), _NO_KWARGS if ttl is None else {"ttl": ttl})

    def temp_get(self, key: str) -> bytes | None:
        return self._call("temp_get", (key,))

    def temp_delete(self, *keys: str) -> int:
        return int(self._call("temp_delete", keys))

    # -- Batches (one round trip each; the worker data flow uses them when a backend has them) ---
    def temp_put_many(self, items: list[tuple[str, bytes]]) -> None:
        """temp_put of each (key, data), with the server's TTL."""
        self._call("temp_put_many", (list(items),))

    def temp_get_many(self, keys: list[str]) -> list[bytes | None]:
        return self._call("temp_get_many", (list(keys),))

    def temp_take(self, key: str, *also_delete: str) -> bytes | None:
        """temp_get(key), then temp_delete(key, *also_delete) whether or not the get worked."""
        return self._call("temp_take", (key, also_delete))

    # -- Lifecycle and monitoring ---------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        out: dict[str, Any] = self._call("info", ())
        out["address"] = self.address
        out["owns_server"] = self.owns_server
        return out

    @property
    def closed(self) -> bool:
        return self._closed

    def ping(self) -> bool:
        try:
            return bool(self._call("hello", ()))
        except Exception:
            return False

    def close(self) -> None:
        """Close this client's connections; if this backend started the server, stop it."""
        if self._closed:
            return
        self._closed = True
        if self._pid == os.getpid():
            with self._conns_lock:
                conns = list(self._conns)
                self._conns.clear()
            for conn in conns:
                try:
                    conn.close()
                except OSError:
                    pass
        finalizer, self._finalizer = self._finalizer, None
        if finalizer is not None and self._pid == os.getpid():
            finalizer()
        self._server = None

    def __enter__(self) -> "ManagerBackend":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ManagerBackend(address={self.address!r}, owns_server={self.owns_server}, closed={self._closed})"


def _attach(address: Address, authkey: bytes, config: BackendConfig) -> ManagerBackend:
    """Unpickle: a client of the same server that connects on first use (never owns the server)."""
    backend = ManagerBackend.__new__(ManagerBackend)
    backend.config = config
    backend._server = None
    backend._finalizer = None
    backend._init_client(address, authkey)
    return backend
