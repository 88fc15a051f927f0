"""ManagerBackend specifics: addresses and authkeys, one round trip per operation, failure modes
(dead, hung, restarted server), the signing key hand-over, and the server's lifetime."""
from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from xml_pipeline.errors import BackendUnavailable, ConfigError
from xml_pipeline.memory import (
    BackendConfig,
    ContextBuffer,
    InMemoryBackend,
    ManagerBackend,
    SharedBackend,
    deserialize_slot,
    serialize_slot,
)

AUTHKEY = "manager-tests-authkey-0123456789"
MakeBackend = Callable[..., SharedBackend]


def server_at(address: str, **config: Any) -> ManagerBackend:
    return ManagerBackend(BackendConfig(backend_type="manager", **config), address=address,
                          authkey=AUTHKEY, start_server=True)


def client_of(address: str, **config: Any) -> ManagerBackend:
    return ManagerBackend(BackendConfig(backend_type="manager", manager_address=address,
                                        manager_authkey=AUTHKEY, **config))


def server_pid(backend: ManagerBackend) -> int:
    return int(backend.info()["server_pid"])


def gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in state  # a zombie nobody reaped is gone too


# -- addresses and keys -----------------------------------------------------------------------------


def test_tcp_server_and_clients_share_data() -> None:
    with server_at("127.0.0.1:0") as server:
        host, port = server.address.rsplit(":", 1)
        assert host == "127.0.0.1" and int(port) > 0 and server.owns_server
        with client_of(server.address) as client:
            assert not client.owns_server
            assert client.buffer_append("t", b"x") == 0
            assert server.buffer_get_thread("t") == [b"x"]
        assert server.buffer_thread_len("t") == 1  # closing a client leaves the server running
        clone = pickle.loads(pickle.dumps(server))  # what a spawned child receives
        assert not clone.owns_server and clone.buffer_thread_len("t") == 1
        clone.close()


def test_unix_socket_server_and_clients(tmp_path: Path) -> None:
    path = tmp_path / "xp.sock"
    server = server_at(str(path))
    try:
        assert server.address == str(path) and path.is_socket()
        with client_of(f"unix://{path}") as client:
            client.registry_set("a.b", "u1")
            assert server.registry_get_uuid("a.b") == "u1"
    finally:
        server.close()
    assert not path.exists()


def test_private_server_is_reachable_only_with_its_authkey() -> None:
    with ManagerBackend() as private:
        assert private.owns_server and len(private.authkey) == 32
        assert os.stat(os.path.dirname(private.address)).st_mode & 0o077 == 0  # a 0700 directory
        with ManagerBackend(private.client_config()) as other:
            other.buffer_append("t", b"x")
        assert private.buffer_thread_len("t") == 1
        wrong = private.client_config().replace(manager_authkey="not-the-right-authkey-000")
        with pytest.raises(BackendUnavailable, match="authkey"):
            ManagerBackend(wrong)


@pytest.mark.parametrize("address", ["0.0.0.0:5000", "10.1.2.3:5000", "example.com:5000", "127.0.0.1",
                                     "127.0.0.1:99999", "relative/path.sock", ":5000"])
def test_bad_addresses_are_refused(address: str) -> None:
    with pytest.raises(ConfigError) as info:
        ManagerBackend(address=address, authkey=AUTHKEY)
    assert info.value.field == "backend.manager_address"
    assert "127.0.0.1:PORT" in str(info.value) and "Unix socket" in str(info.value)


def test_an_address_in_use_is_reported() -> None:
    with server_at("127.0.0.1:0") as first:
        with pytest.raises(BackendUnavailable, match=f"could not listen on {first.address}.*in use"):
            server_at(first.address)
        assert first.ping()


def test_an_address_needs_an_authkey_of_16_bytes() -> None:
    with pytest.raises(ConfigError, match="backend.manager_authkey.*required"):
        ManagerBackend(BackendConfig(backend_type="manager", manager_address="127.0.0.1:1"))
    with pytest.raises(ConfigError, match="backend.manager_authkey.*16"):
        ManagerBackend(address="127.0.0.1:1", authkey="short")


# -- one round trip ---------------------------------------------------------------------------------


class CountingConnection:
    def __init__(self, conn: Any) -> None:
        self.conn, self.sends, self.recvs = conn, 0, 0

    def send(self, obj: Any) -> None:
        self.sends += 1
        self.conn.send(obj)

    def recv(self) -> Any:
        self.recvs += 1
        return self.conn.recv()

    def close(self) -> None:
        self.conn.close()


def test_every_operation_is_exactly_one_round_trip(make_backend: MakeBackend) -> None:
    b = make_backend("manager")
    assert b.ping()
    counting = CountingConnection(b._local.conn)  # type: ignore[attr-defined]
    b._local.conn = counting  # type: ignore[attr-defined]
    operations: list[Callable[[], object]] = [
        lambda: b.buffer_append("t", b"x"),
        lambda: b.buffer_append("t", b"y", max_slots=10, append_id="op-1"),
        lambda: b.buffer_get_thread("t"), lambda: b.buffer_get_slot("t", 0),
        lambda: b.buffer_thread_len("t"), lambda: b.buffer_thread_exists("t"),
        lambda: b.buffer_list_threads(),
        lambda: b.registry_set("a.b", "u1"), lambda: b.registry_get_or_create("a.c", "u2"),
        lambda: b.registry_get_uuid("a.b"), lambda: b.registry_get_chain("u1"),
        lambda: b.registry_list_all(), lambda: b.registry_delete("u1"),
        lambda: b.temp_put("k", b"v"), lambda: b.temp_get("k"), lambda: b.temp_delete("k"),
        lambda: b.buffer_delete_thread("t"), lambda: b.buffer_clear(), lambda: b.registry_clear(),
        lambda: ContextBuffer(b).append("t", "payload", "a", "b"),
    ]
    for op in operations:
        before = counting.sends
        op()
        assert (counting.sends - before, counting.recvs - before) == (1, 1)
    assert b._local.conn is counting  # type: ignore[attr-defined]  # and no new connection


# -- failure modes ----------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_dead_server_fails_at_once_not_after_a_timeout(make_backend: MakeBackend) -> None:
    owner = make_backend("manager", socket_timeout=120.0)  # a hang would hit the test timeout
    client = ManagerBackend(owner.client_config())  # type: ignore[attr-defined]
    assert client.buffer_append("t", b"x") == 0
    pid = server_pid(client)
    os.kill(pid, signal.SIGKILL)
    while not gone(pid):
        time.sleep(0.01)
    for op in (lambda: client.buffer_append("t", b"y"), lambda: client.buffer_get_thread("t"),
               lambda: owner.registry_get_uuid("a")):
        with pytest.raises(BackendUnavailable, match="manager server at .* is unavailable"):
            op()
    assert client.ping() is False and owner.ping() is False
    with pytest.raises(BackendUnavailable):
        ManagerBackend(owner.client_config())  # type: ignore[attr-defined]
    client.close()


@pytest.mark.timeout(30)
def test_hung_server_times_out_then_recovers(make_backend: MakeBackend) -> None:
    owner = make_backend("manager", socket_timeout=0.5)
    client = ManagerBackend(owner.client_config())  # type: ignore[attr-defined]
    client.buffer_append("t", b"x")
    pid = server_pid(client)
    os.kill(pid, signal.SIGSTOP)
    while "\nState:\tT" not in Path(f"/proc/{pid}/status").read_text():  # signals arrive asynchronously
        time.sleep(0.005)
    try:
        with pytest.raises(BackendUnavailable, match="no answer within 0.5 s"):
            client.buffer_thread_len("t")
        with pytest.raises(BackendUnavailable):  # a new connection cannot finish its handshake either
            ManagerBackend(owner.client_config())  # type: ignore[attr-defined]
    finally:
        os.kill(pid, signal.SIGCONT)
    assert client.buffer_thread_len("t") == 1  # the same object reconnects by itself
    client.close()


def test_restart_with_the_same_authkey_keeps_the_key_and_clients_recover() -> None:
    first = server_at("127.0.0.1:0")
    address = first.address
    client = client_of(address)
    blob = serialize_slot({"written": "before the restart"}, signer=client.signer)
    client.buffer_append("t", blob)
    first.close()
    with pytest.raises(BackendUnavailable):
        client.buffer_thread_len("t")
    second = server_at(address)
    try:
        assert client.buffer_thread_len("t") == 0  # new, empty server; the old client reconnected
        assert second.signer.keys == client.signer.keys
        with client_of(address) as fresh:
            assert deserialize_slot(blob, signer=fresh.signer) == {"written": "before the restart"}
    finally:
        client.close()
        second.close()


def test_the_server_hands_its_key_to_clients() -> None:
    configured = "configured-signing-key-0123456789"
    with server_at("127.0.0.1:0", signing_key=configured) as server:
        with client_of(server.address) as client:  # the client has no key of its own
            assert client.signer.keys == (configured.encode(),) == server.signer.keys
    with ManagerBackend(authkey=AUTHKEY) as a, ManagerBackend(authkey=AUTHKEY) as b:
        assert a.signer.keys == b.signer.keys  # derived from the authkey: stable across servers
        assert not a.signer.local  # and shared by every client, secret because the authkey is
    with ManagerBackend() as c, ManagerBackend() as d:
        assert c.signer.keys != d.signer.keys


# -- the server process -----------------------------------------------------------------------------


def run_script(tmp_path: Path, code: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(code))
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)


def test_works_from_a_script_without_a_main_guard(tmp_path: Path) -> None:
    # multiprocessing's spawn would re-run this script in the server process and fail.
    result = run_script(tmp_path, """
        from xml_pipeline.memory import get_shared_backend, BackendConfig, get_context_buffer
        config = BackendConfig(backend_type="manager")
        backend = get_shared_backend(config)
        buffer = get_context_buffer(backend=backend)
        print(buffer.append("t", "hello", "a", "b").index, buffer.is_shared)
    """)
    assert (result.returncode, result.stdout.strip()) == (0, "0 True"), result.stderr


def test_server_stops_when_its_owner_dies(tmp_path: Path) -> None:
    result = run_script(tmp_path, """
        import os, signal
        from xml_pipeline.memory import ManagerBackend
        backend = ManagerBackend()
        print(backend.info()["server_pid"], backend.address, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup code runs
    """)
    assert result.returncode == -signal.SIGKILL
    pid_text, address = result.stdout.split()
    deadline = time.monotonic() + 20
    while not gone(int(pid_text)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gone(int(pid_text)), "the manager server outlived its owner"
    assert not os.path.exists(address)


def test_memory_backend_refuses_to_be_pickled() -> None:
    with pytest.raises(TypeError, match="'manager' or 'redis'"):
        pickle.dumps(InMemoryBackend())
