"""The manager server: the process that holds a ManagerBackend's data (manager.py is the client).

ONE object lives in the server: an InMemoryBackend (so the TTL emulation, atomic index, dedup and
slot limit are the same code as the memory backend). It is registered in the BaseManager server
under a fixed id at start, so clients need no `create`/`incref` round trips and no nested proxies;
each client request is the stdlib manager protocol's `(id, method, args, kwargs)`.

The process is a fresh interpreter (`python -c ...serve()`), not a multiprocessing child: no fork
of a threaded parent, and no re-import of the user's __main__ (which makes spawn fail for scripts
without an `if __name__ == "__main__"` guard, like short example scripts). It stops when its owner
closes the backend or dies (its stdin is a lifeline).
"""
from __future__ import annotations

import hashlib
import hmac
import multiprocessing
import os
import pickle
import select
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from multiprocessing.managers import BaseManager, Server
from typing import Any, ClassVar

from ..errors import BackendUnavailable
from .config import BackendConfig
from .inmemory import InMemoryBackend
from .manager_io import BufferedConnection
from .protocol import Appended
from .signing import Signer

__all__ = ["PROTOCOL", "STORE_ID", "derive_manager_signer", "read_msg", "serve", "start_server", "tune_socket",
           "write_msg"]

Address = tuple[str, int] | str

#: The client/server protocol version (a client refuses a server that speaks another).
PROTOCOL = 1
#: id of the one store object inside the server (fixed, so clients need no `create` round trip).
STORE_ID = "xp-store"
#: Seconds a starting server may take to report its address (a cold interpreter start).
_START_TIMEOUT = 30.0
_EXPOSED = (
    "hello", "info", "buffer_append", "buffer_get_thread", "buffer_get_slot", "buffer_thread_len",
    "buffer_thread_exists", "buffer_delete_thread", "buffer_list_threads", "buffer_clear",
    "registry_set", "registry_get_or_create", "registry_get_uuid", "registry_get_chain",
    "registry_delete", "registry_list_all", "registry_clear", "temp_put", "temp_get", "temp_delete",
    "temp_put_many", "temp_get_many", "temp_take", "buffer_append_at", "buffer_append_many",
)


def derive_manager_signer(authkey: bytes) -> Signer:
    """The signing key of a server with no configured key: secret (derived from the authkey) and
    stable across restarts with the same authkey."""
    return Signer((hmac.new(authkey, b"xml-pipeline manager signing key v1", hashlib.sha256).digest(),))


_server_settings: dict[str, Any] = {}


class _ServerStore(InMemoryBackend):
    """The one object of the server. `hello` tells a client the protocol and the signing keys."""

    def hello(self) -> dict[str, Any]:
        return {"protocol": PROTOCOL, "keys": self.signer.keys, "ttl": self.ttl, "pid": os.getpid()}

    def info(self) -> dict[str, Any]:
        out = super().info()
        out["backend"] = "manager"
        out["server_pid"] = os.getpid()
        return out

    # Several operations of the worker data flow in one round trip. Each is the store's own
    # operation (same checks, same lock, same TTL), just called here instead of once per request.
    def temp_put_many(self, items: list[tuple[str, bytes]]) -> None:
        for key, data in items:
            self.temp_put(key, data)

    def temp_get_many(self, keys: list[str]) -> list[bytes | None]:
        return [self.temp_get(k) for k in keys]

    def buffer_append_many(self, calls: list[tuple[str, bytes, int, int | None, str | None,
                                                  list[tuple[str, bytes]]]]) -> list[Appended | Exception]:
        """buffer_append_at of each (thread, slot, index, max_slots, append_id, items), in order; each
        call's own outcome or exception in its place, so one full thread fails only its append."""
        out: list[Appended | Exception] = []
        for thread_id, slot, index, max_slots, append_id, items in calls:
            try:
                out.append(self.buffer_append_at(thread_id, slot, index, max_slots=max_slots,
                                                 append_id=append_id, items=items))
            except Exception as e:  # noqa: BLE001 - sent back to that append's caller
                out.append(e)
        return out

    def temp_take(self, key: str, also_delete: tuple[str, ...]) -> bytes | None:  # type: ignore[override]  # the wire form: keys as one tuple
        try:
            return self.temp_get(key)
        finally:
            self.temp_delete(key, *also_delete)


class _StoreServer(Server):
    # Set by Server.__init__; typeshed's stub leaves it out.
    id_to_refcount: dict[str, int]

    def __init__(self, registry: dict[str, Any], address: Any, authkey: bytes, serializer: str) -> None:
        super().__init__(registry, address, authkey, serializer)
        keys: tuple[bytes, ...] = _server_settings.get("keys") or derive_manager_signer(authkey).keys
        config = _server_settings.get("config") or BackendConfig(backend_type="manager")
        store = _ServerStore(config, signer=Signer(keys))
        # No method hands back a proxy: an empty method_to_typeid, which the stdlib treats like None.
        self.id_to_obj[STORE_ID] = (store, set(_EXPOSED), {})
        self.id_to_refcount[STORE_ID] = 1  # never released

    def handle_request(self, conn: Any) -> None:
        tune_socket(conn.fileno())
        # The same socket as a BufferedConnection (same bytes on the wire, fewer copies of a slot).
        handle, conn._handle = conn._handle, None  # noqa: SLF001 - handed over, closed by the new object
        super().handle_request(BufferedConnection(handle))


def _the_store() -> _ServerStore:
    """The registered typeid 'store': a standard proxy to the same one object (for debugging)."""
    server = multiprocessing.current_process()._manager_server  # type: ignore[attr-defined]
    return server.id_to_obj[STORE_ID][0]


class _StoreManager(BaseManager):
    _Server = _StoreServer
    # Filled by register() below; typeshed's BaseManager stub leaves it out. A bare annotation, so
    # register() still copies the base class's registry into this class on first use.
    _registry: ClassVar[dict[str, tuple[Callable[..., Any], Iterable[str], dict[str, str], Any]]]


_StoreManager.register("store", callable=_the_store, exposed=_EXPOSED)


def write_msg(stream: Any, obj: object) -> None:
    data = pickle.dumps(obj)
    stream.write(struct.pack("!I", len(data)) + data)
    stream.flush()


def _read_exact(stream: Any, n: int, deadline: float | None) -> bytes:
    buf = b""
    fd = stream.fileno()
    while len(buf) < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError("no answer")
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return buf


def read_msg(stream: Any, deadline: float | None = None) -> Any:
    (n,) = struct.unpack("!I", _read_exact(stream, 4, deadline))
    return pickle.loads(_read_exact(stream, n, deadline))


def serve() -> None:
    """Entry point of the manager server process (a fresh interpreter started by ManagerBackend).

    Settings arrive as one pickle on stdin; stdin then stays open as a lifeline: when the process
    that started us closes it or dies, the server exits (no orphaned servers). Started with
    `python -c`, so the starting program's __main__ is never re-imported (the spawn start method
    would re-run a script that lacks an `if __name__ == "__main__"` guard).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the owner; the lifeline stops us
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    settings = read_msg(stdin)
    _server_settings.update(config=settings["config"], keys=settings["keys"])
    try:
        server = _StoreServer(_StoreManager._registry, settings["address"], settings["authkey"], "pickle")
    except Exception as e:  # noqa: BLE001 - reported to the owner, which raises BackendUnavailable
        write_msg(stdout, ("error", f"{type(e).__name__}: {e}"))
        sys.exit(1)
    write_msg(stdout, ("ok", server.address))

    def lifeline() -> None:
        while os.read(stdin.fileno(), 4096):
            pass
        if isinstance(server.address, str):
            try:
                os.unlink(server.address)
            except OSError:
                pass
        os._exit(0)

    threading.Thread(target=lifeline, name="xp-lifeline", daemon=True).start()
    server.serve_forever()


def tune_socket(fd: int, timeout: float | None = None) -> None:
    """TCP_NODELAY (replies over 16 KiB are sent in two writes), and kernel-level I/O timeouts that
    multiprocessing's blocking Connection honours (a read past the timeout raises BlockingIOError)."""
    s = socket.socket(fileno=os.dup(fd))
    try:
        if s.family in (socket.AF_INET, socket.AF_INET6):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if timeout is not None:
            sec = int(timeout)
            tv = struct.pack("ll", sec, int((timeout - sec) * 1e6))
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
    finally:
        s.close()


def start_server(owner: object, address: Address, authkey: bytes, config: BackendConfig,
                 cleanup: tuple[str, ...], where: str) -> tuple[subprocess.Popen[bytes], weakref.finalize, Address]:
    """Start a server process bound at `address` (`where` names it in errors): (the process, the
    finalizer that stops it and removes `cleanup` when `owner` is collected or it is called, the
    address it listens on). Raises BackendUnavailable when it does not come up."""
    if isinstance(address, str):
        _remove_stale_socket(address)
    import xml_pipeline
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(xml_pipeline.__file__ or "")))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    proc = subprocess.Popen(
        [sys.executable, "-c", "from xml_pipeline.memory.manager_server import serve; serve()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, close_fds=True,
    )
    finalizer = weakref.finalize(owner, _stop_server, proc, cleanup, os.getpid())
    try:
        assert proc.stdin is not None and proc.stdout is not None
        write_msg(proc.stdin, {"address": address, "authkey": authkey, "config": config,
                               "keys": config.signing_keys})
        status, detail = read_msg(proc.stdout, time.monotonic() + _START_TIMEOUT)
    except (OSError, EOFError, TimeoutError) as e:
        finalizer()
        raise BackendUnavailable(f"the manager server for {where} did not start "
                                 f"(exit code {proc.poll()}): {type(e).__name__} {e}") from None
    if status != "ok":
        finalizer()
        raise BackendUnavailable(f"the manager server could not listen on {where}: {detail}")
    return proc, finalizer, detail


def _stop_server(proc: subprocess.Popen[bytes], cleanup: tuple[str, ...], owner_pid: int) -> None:
    """Close the lifeline, wait briefly, then make sure; remove the socket file / private dir."""
    if os.getpid() != owner_pid:
        return  # a forked copy of the owner exiting: the server belongs to the original process
    try:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    finally:
        for path in cleanup:
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                try:
                    os.unlink(path)
                except OSError:
                    pass


def _remove_stale_socket(path: str) -> None:
    """Before binding a Unix socket: remove a socket file nobody listens on any more."""
    try:
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            return
    except FileNotFoundError:
        return
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)
        except OSError:
            pass
