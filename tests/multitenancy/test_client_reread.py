"""A client configured from a mounted binding carries on across a rotation of its password: when Redis
refuses the password of a new connection, OrganismClient re-reads the binding (which the kubelet updates
in place) and uses the new one. A client configured from the environment cannot (a restart reads the new
secretKeyRef value), and says so clearly. Real redis-server, real ACL user."""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis_server import RedisServer

from xml_pipeline.client import OrganismClient
from xml_pipeline.errors import BackendUnavailable, CredentialsRejected
from xml_pipeline.memory import BackendConfig
from xml_pipeline.memory.context_buffer import ContextBuffer
from xml_pipeline.memory.redis_backend import RedisBackend

ADMIN = "admin-reread-pw"
USER, PREFIX, KEY = "xpc-test.reread", "xp:test.reread:", "s" * 32


@pytest.fixture
def server() -> Iterator[RedisServer]:
    s = RedisServer(password=ADMIN).start()
    admin = s.client()
    admin.execute_command("ACL", "SETUSER", USER, "on", ">old-password", f"~{PREFIX}*", "+@all")
    with RedisBackend(BackendConfig(backend_type="redis", redis_url=s.url, redis_prefix=PREFIX,
                                    redis_password=ADMIN, signing_key=KEY)) as pods:
        ContextBuffer(pods).append("t-1", "<order/>", "shop", "console")
    admin.close()
    yield s
    s.cleanup()


def write(directory: Path, values: dict[str, str]) -> None:
    """As the kubelet updates a mounted Secret: the new files appear at once (a symlink swap)."""
    directory.mkdir(parents=True, exist_ok=True)
    for k, v in values.items():
        tmp = directory / f".{k}.new"
        tmp.write_text(v)
        os.replace(tmp, directory / k)


def rotate(server: RedisServer) -> None:
    """Redis forgets the old password and drops the client's connections (a new one must log in)."""
    admin = server.client()
    admin.execute_command("ACL", "SETUSER", USER, "resetpass", ">new-password")
    admin.execute_command("CLIENT", "KILL", "USER", USER)
    admin.close()


def test_a_binding_client_rereads_its_password_after_a_rotation(server: RedisServer, tmp_path: Path) -> None:
    d = tmp_path / "bindings" / "shop"
    write(d, {"type": "redis", "provider": "xml-pipeline", "url": server.url, "username": USER,
              "password": "old-password", "prefix": PREFIX, "ttl": "600", "signing-key": KEY})
    with OrganismClient(binding=d) as client:
        assert client.binding == d and [s.payload for s in client.read_thread("t-1")] == ["<order/>"]
        rotate(server)
        # Not yet in the binding: the refusal is reported, naming the user and the binding, never a password.
        with pytest.raises(BackendUnavailable) as caught:
            client.read_thread("t-1")
        text = str(caught.value)
        assert isinstance(caught.value, CredentialsRejected) and "refused the password" in text and USER in text
        assert f"binding {d} re-read" in text and "old-password" not in text and "new-password" not in text
        write(d, {"password": "new-password"})  # the kubelet's refresh
        assert [s.payload for s in client.read_thread("t-1")] == ["<order/>"]
        assert client.config.redis_password == "new-password"


def test_discovered_binding_is_reread_too(server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = tmp_path / "bindings" / "shop"
    write(d, {"type": "redis", "provider": "xml-pipeline", "url": server.url, "username": USER,
              "password": "old-password", "prefix": PREFIX, "ttl": "600", "signing-key": KEY})
    for var in [v for v in os.environ if v.startswith("XP_")]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("SERVICE_BINDING_ROOT", str(tmp_path / "bindings"))
    with OrganismClient() as client:
        assert client.binding == d
        client.threads()
        rotate(server)
        write(d, {"password": "new-password"})
        assert client.threads() == ["t-1"]


def test_an_env_client_reports_the_refusal(server: RedisServer) -> None:
    config = BackendConfig(backend_type="redis", redis_url=server.url, redis_prefix=PREFIX, redis_username=USER,
                           redis_password="old-password", signing_key=KEY)
    with OrganismClient(config) as client:
        assert client.binding is None
        client.threads()
        rotate(server)
        with pytest.raises(CredentialsRejected, match=r"refused the password of user 'xpc-test.reread'$"):
            client.threads()
    with pytest.raises(TypeError):
        OrganismClient(config, binding="/bindings/shop")


def test_threads_sharing_a_client_reconnect_once(server: RedisServer, tmp_path: Path) -> None:
    """A web service shares one client between threads: after a rotation each thread's call succeeds, one
    pool replaces the old one, and the old pool stays open until the client closes (a thread may use it)."""
    from concurrent.futures import ThreadPoolExecutor

    d = tmp_path / "shop"
    write(d, {"type": "redis", "provider": "xml-pipeline", "url": server.url, "username": USER,
              "password": "old-password", "prefix": PREFIX, "ttl": "600", "signing-key": KEY})
    client = OrganismClient(binding=d)
    first = client.backend
    client.threads()
    rotate(server)
    write(d, {"password": "new-password"})
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: client.threads(), range(16)))
    assert results == [["t-1"]] * 16
    assert client.backend is not first and client._retired == [first]
    client.close()
    assert client._retired == []
