"""A client reaching an organism's Redis over TLS with the binding's CA certificate (ca.crt), on a real
redis-server serving TLS with a CA made for the test (tests/redis_server.py's TLSRedisServer)."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis_server import TLSFiles, TLSRedisServer

from xml_pipeline.binding import CA_FILE
from xml_pipeline.client import OrganismClient
from xml_pipeline.errors import BackendUnavailable, ConfigError
from xml_pipeline.memory import BackendConfig
from xml_pipeline.memory.context_buffer import ContextBuffer
from xml_pipeline.memory.factory import default_config
from xml_pipeline.memory.redis_backend import RedisBackend
from xml_pipeline.message_bus.message import Message

PASSWORD = "tls-test-password-0123456789"
KEY = "k" * 32


def start_tls(tls_files: TLSFiles, password: str) -> TLSRedisServer:
    """A TLS-only redis-server with a password; the test is skipped where the binary has no TLS."""
    server = TLSRedisServer(tls_files, password=password)
    try:
        return server.start()  # type: ignore[return-value]
    except RuntimeError as e:
        server.cleanup()
        pytest.skip(f"no TLS server here: {e} when given the --tls-* options (built without TLS?)")


@pytest.fixture
def tls_redis(tls_files: TLSFiles) -> Iterator[TLSRedisServer]:
    server = start_tls(tls_files, PASSWORD)
    yield server
    server.cleanup()


def write_binding(root: Path, server: TLSRedisServer, ca: Path | None, *, prefix: str = "xp:tls.shop:") -> Path:
    """A binding directory as the kubelet mounts the operator's <name>-binding Secret."""
    d = root / "shop"
    d.mkdir(parents=True, exist_ok=True)
    values = {"type": "redis", "provider": "xml-pipeline", "host": "127.0.0.1", "port": str(server.port),
              "url": server.url, "username": "default", "password": PASSWORD, "prefix": prefix, "ttl": "600",
              "signing-key": KEY, "tls": "true"}
    for k, v in values.items():
        (d / k).write_text(v + "\n")
    if ca is not None:
        (d / CA_FILE).write_bytes(ca.read_bytes())
    return d


def test_client_with_the_bindings_ca_talks_to_a_tls_server(tls_redis: TLSRedisServer, tmp_path: Path) -> None:
    config = BackendConfig.from_binding(write_binding(tmp_path, tls_redis, tls_redis.tls.ca))
    assert config.redis_url.startswith("rediss://") and config.redis_ca_cert == str(tmp_path / "shop" / CA_FILE)
    with RedisBackend(config) as pods:  # the organism's side, same TLS settings
        ContextBuffer(pods).append("t-tls", "<order id='1'/>", "shop", "console")
        assert pods.connection_kwargs()["ssl_ca_certs"] == config.redis_ca_cert
    with OrganismClient(config) as client:
        assert [s.payload for s in client.read_thread("t-tls")] == ["<order id='1'/>"]
        sent = client.send(Message(sender="web", to="greeter", payload="<greet name='Ada'/>"))
        assert "t-tls" in client.threads()
    # The message really crossed the TLS port into the ingress stream.
    plain = tls_redis.client()
    assert [e[0].decode() for e in plain.xrange("xp:tls.shop:ingress")]
    assert any(sent.encode() in b"".join(v for v in fields.values()) for _, fields in plain.xrange("xp:tls.shop:ingress"))
    plain.close()


def test_a_wrong_ca_is_refused_with_a_clear_error(tls_redis: TLSRedisServer, tmp_path: Path) -> None:
    config = BackendConfig.from_binding(write_binding(tmp_path, tls_redis, tls_redis.tls.other_ca))
    with OrganismClient(config.replace(retries=0, connect_timeout=2.0)) as client:
        with pytest.raises(BackendUnavailable) as caught:
            client.read_thread("t-any")
    text = str(caught.value)
    assert "certificate verify failed" in text and "rediss://127.0.0.1" in text
    assert PASSWORD not in text


def test_without_a_ca_the_system_trust_store_refuses_a_private_ca(tls_redis: TLSRedisServer, tmp_path: Path) -> None:
    """No ca.crt in the binding: the system trust store decides, and it does not know the test CA."""
    config = BackendConfig.from_binding(write_binding(tmp_path, tls_redis, None))
    assert config.redis_ca_cert is None
    with RedisBackend(config.replace(retries=0)) as b:
        with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
            b.client.ping()


def test_env_mode_takes_the_ca_from_the_mounted_binding(tls_redis: TLSRedisServer, tmp_path: Path) -> None:
    """The webhook's env mode: XP_* from secretKeyRefs, and only ca.crt (with type and provider) mounted
    under SERVICE_BINDING_ROOT; no XP_* variable names a CA file."""
    d = tmp_path / "bindings" / "shop"
    d.mkdir(parents=True)
    for k, v in {"type": "redis", "provider": "xml-pipeline"}.items():
        (d / k).write_text(v)
    (d / CA_FILE).write_bytes(tls_redis.tls.ca.read_bytes())
    env = {"XP_BACKEND_TYPE": "redis", "XP_REDIS_URL": tls_redis.url, "XP_REDIS_PASSWORD": PASSWORD,
           "XP_REDIS_PREFIX": "xp:tls.env:", "XP_SIGNING_KEY": KEY, "SERVICE_BINDING_ROOT": str(tmp_path / "bindings")}
    config = default_config(env)
    assert config.redis_ca_cert == str(d / CA_FILE)
    with OrganismClient(config) as client:
        assert client.read_thread("t-none") == []
    # A plain URL takes nothing from the binding (a CA there would be refused beside redis://).
    assert default_config({**env, "XP_REDIS_URL": "redis://127.0.0.1:6379/0"}).redis_ca_cert is None


# -- validation ------------------------------------------------------------------------------------------
def test_ca_cert_must_be_a_readable_pem_file(tmp_path: Path) -> None:
    url = "rediss://redis.example:6380/0"
    with pytest.raises(ConfigError, match=r"backend\.redis_ca_cert.*does not exist"):
        BackendConfig(backend_type="redis", redis_url=url, redis_ca_cert=str(tmp_path / "missing.crt"))
    with pytest.raises(ConfigError, match=r"backend\.redis_ca_cert.*is a directory"):
        BackendConfig(backend_type="redis", redis_url=url, redis_ca_cert=str(tmp_path))
    key = tmp_path / "key.pem"
    key.write_text("-----BEGIN PRIVATE KEY-----\nabc\n-----END PRIVATE KEY-----\n")
    with pytest.raises(ConfigError, match=r"backend\.redis_ca_cert.*holds no PEM certificate"):
        BackendConfig(backend_type="redis", redis_url=url, redis_ca_cert=str(key))
    unreadable = tmp_path / "unreadable.crt"
    unreadable.write_text("-----BEGIN CERTIFICATE-----\n")
    unreadable.chmod(0)
    try:
        import os
        if os.geteuid() != 0:  # root reads anything
            with pytest.raises(ConfigError, match=r"backend\.redis_ca_cert.*cannot be read"):
                BackendConfig(backend_type="redis", redis_url=url, redis_ca_cert=str(unreadable))
    finally:
        unreadable.chmod(0o600)
    with pytest.raises(ConfigError, match=r"backend\.redis_ca_cert.*must be a non-empty string"):
        BackendConfig(backend_type="redis", redis_url=url, redis_ca_cert=42)  # type: ignore[arg-type]
    ok = BackendConfig(backend_type="redis", redis_url=url, redis_ca_cert=str(unreadable))
    assert ok.tls_kwargs() == {"ssl_ca_certs": str(unreadable)}
    assert BackendConfig(backend_type="redis", redis_url=url).tls_kwargs() == {}
    # organism.yaml may name the CA while the environment brings the URL: a plain URL does not use it.
    plain = BackendConfig(backend_type="redis", redis_url="redis://h:6379/0", redis_ca_cert=str(unreadable))
    assert plain.tls_kwargs() == {}


def test_ca_cert_in_organism_yaml_and_in_a_binding(tmp_path: Path) -> None:
    doc = tmp_path / "organism.yaml"
    doc.write_text("backend:\n  type: redis\n  redis_url: rediss://r.example:6380/0\n"
                   f"  redis_ca_cert: {tmp_path / 'nope.crt'}\n")
    with pytest.raises(ConfigError) as caught:
        BackendConfig.from_yaml(doc)
    assert caught.value.field == "backend.redis_ca_cert" and str(doc) in str(caught.value)
    # organism.yaml names the CA, the environment brings the TLS URL (as in the operator's pods).
    ca = tmp_path / "ca.crt"
    ca.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    doc.write_text(f"backend:\n  type: redis\n  redis_ca_cert: {ca}\n")
    layered = BackendConfig.from_env({"XP_CONFIG": str(doc), "XP_REDIS_URL": "rediss://r.example:6380/0"})
    assert layered.tls_kwargs() == {"ssl_ca_certs": str(ca)}
    # A binding's ca.crt that is not a certificate: the error names the file.
    d = tmp_path / "b"
    d.mkdir()
    for k, v in {"type": "redis", "provider": "xml-pipeline", "url": "rediss://r.example:6380/0",
                 "prefix": "xp:a.b:", "tls": "true", CA_FILE: "not a certificate"}.items():
        (d / k).write_text(v)
    with pytest.raises(ConfigError) as caught:
        BackendConfig.from_binding(d)
    assert caught.value.field == f"{d}/{CA_FILE}" and "holds no PEM certificate" in str(caught.value)


async def test_the_raw_connections_verify_with_the_bindings_ca(tls_redis: TLSRedisServer, tmp_path: Path) -> None:
    """The pump's RedisPipe and a worker's DirectConnection are made from connection_kwargs: the CA file
    (not the system trust store, not SSL_CERT_FILE) verifies the server on those paths too."""
    from xml_pipeline.memory.redis_pipe import RedisPipe
    from xml_pipeline.memory.redis_wire import pack_commands

    right = BackendConfig.from_binding(write_binding(tmp_path / "right", tls_redis, tls_redis.tls.ca))
    wrong = BackendConfig.from_binding(write_binding(tmp_path / "wrong", tls_redis, tls_redis.tls.other_ca))
    with RedisBackend(right.replace(retries=0)) as ok, RedisBackend(wrong.replace(retries=0)) as bad:
        assert ok.connection_kwargs()["ssl_ca_certs"] == right.redis_ca_cert
        direct = ok.new_direct_connection()
        assert direct is not None and direct.pipeline(pack_commands([("PING",)]), 1) == [b"PONG"]
        direct.disconnect()
        pipe = RedisPipe.for_backend(ok)
        assert pipe is not None
        try:
            assert await pipe.take("a" * 32) is None  # connected through TLS, verified with the binding's CA
        finally:
            pipe.close()
        refused = bad.new_direct_connection()
        assert refused is not None
        with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
            refused.pipeline(pack_commands([("PING",)]), 1)
