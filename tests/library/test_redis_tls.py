"""rediss:// end to end on a real TLS-only redis-server (tests/redis_server.py: TLSRedisServer):
the blocking backend, the pump's RedisPipe and a worker's DirectConnection all verify the server's
certificate the same way (here: a private CA trusted through SSL_CERT_FILE, as for the system's
CAs), a wrong CA is a clear error on every path, and a client certificate works where the server
asks for one."""
from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator

import pytest
from redis_server import TLSFiles, TLSRedisServer

from xml_pipeline.errors import BackendUnavailable
from xml_pipeline.memory.config import BackendConfig
from xml_pipeline.memory.protocol import Appended
from xml_pipeline.memory.redis_backend import RedisBackend
from xml_pipeline.memory.redis_direct import DirectConnection
from xml_pipeline.memory.redis_pipe import RedisPipe
from xml_pipeline.memory.redis_wire import pack_commands

KEY = "tls-tests-signing-key-0123456789abcdef"


def backend_on(server: TLSRedisServer, **config: object) -> RedisBackend:
    cfg: dict[str, object] = dict(backend_type="redis", redis_url=server.url, redis_prefix=f"tls{secrets.token_hex(4)}:",
                                  signing_key=KEY, redis_ttl=600, retries=0, connect_timeout=2.0)
    cfg.update(config)
    return RedisBackend(BackendConfig(**cfg))  # type: ignore[arg-type]


def tid() -> str:
    return secrets.token_hex(16)


@pytest.fixture
def trusted(tls_files: TLSFiles, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The test CA is among the CAs every connection trusts (OpenSSL reads SSL_CERT_FILE per context)."""
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_files.ca))
    yield


@pytest.fixture
def wrong_ca(tls_files: TLSFiles, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_files.other_ca))
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    yield


def test_the_blocking_backend_works_over_tls(tls_redis: TLSRedisServer, trusted: None) -> None:
    backend = backend_on(tls_redis)
    try:
        assert backend.connection_kwargs()["tls"] is True and backend.pipe_capable()
        thread = tid()
        assert [backend.buffer_append(thread, backend.signer.sign(b"s%d" % i)) for i in range(3)] == [0, 1, 2]
        assert backend.buffer_append_at(thread, b"x", 3, items=[("k" * 32, b"v")]) == Appended("stored", 3)
        assert backend.temp_take("k" * 32) == b"v"
        assert backend.buffer_thread_len(thread) == 4 and backend.ping()
    finally:
        backend.close()


async def test_the_pipe_works_over_tls_with_group_commit(tls_redis: TLSRedisServer, trusted: None) -> None:
    backend = backend_on(tls_redis)
    pipe = RedisPipe.for_backend(backend)
    assert pipe is not None  # rediss:// keeps the fast path
    try:
        backend.buffer_append(tid(), backend.signer.sign(b"warm-up"))  # the script is known to the server
        assert await pipe.take(secrets.token_hex(16)) is None  # connected (TLS handshake done)
        w0, c0 = pipe.writes, pipe.commands
        thread, n = tid(), 40
        keys = [secrets.token_hex(16) for _ in range(n)]
        outcomes = await asyncio.gather(*(
            pipe.append_at(thread, b"slot %d" % i, i, max_slots=None, append_id=f"a{i}", items=[(keys[i], b"p%d" % i)])
            for i in range(n)))
        assert sorted(o.position for o in outcomes) == list(range(n)) and {o.status for o in outcomes} == {"stored"}
        assert pipe.commands - c0 == 2 * n and pipe.writes - w0 == 1  # one write carried them all
        assert await asyncio.gather(*(pipe.take(k) for k in keys)) == [b"p%d" % i for i in range(n)]
        assert backend.buffer_thread_len(thread) == n
    finally:
        pipe.close()
        backend.close()


def test_a_workers_direct_connection_works_over_tls(tls_redis: TLSRedisServer, trusted: None) -> None:
    backend = backend_on(tls_redis, retries=3)
    try:
        backend.use_direct_connection()
        direct = backend._direct  # noqa: SLF001 - the test looks at what carried the commands
        assert direct is not None
        keys = [secrets.token_hex(16) for _ in range(3)]
        backend.temp_put_many([(k, k.encode()) for k in keys])
        assert backend.temp_get_many(keys) == [k.encode() for k in keys]
        assert direct.round_trips == 2
        tls_redis.restart()  # same port and certificate: the next call reconnects (TLS handshake again)
        backend.temp_put_many([(keys[0], b"again")])
        assert backend.temp_get_many([keys[0]]) == [b"again"]
    finally:
        backend.close()


async def test_a_wrong_ca_is_a_clear_error_on_every_path(tls_redis: TLSRedisServer, wrong_ca: None) -> None:
    backend = backend_on(tls_redis, retries=3)
    pipe = RedisPipe(backend)
    try:
        # Not retried: a certificate that does not verify will not verify on the next attempt either.
        with pytest.raises(BackendUnavailable, match="after 1 attempt.*certificate verify failed") as blocking:
            backend.buffer_thread_len(tid())
        assert tls_redis.url.split("//")[1].split("/")[0] in str(blocking.value)
        with pytest.raises(BackendUnavailable, match="SSLCertVerificationError.*certificate verify failed"):
            await pipe.take(secrets.token_hex(16))
        backend.use_direct_connection()
        with pytest.raises(BackendUnavailable, match="after 1 attempt.*certificate verify failed"):
            backend.temp_get_many([secrets.token_hex(16)])
        assert not backend.ping()
    finally:
        pipe.close()
        backend.close()


def test_a_client_certificate_where_the_server_asks_for_one(tls_files: TLSFiles) -> None:
    server = TLSRedisServer(tls_files, auth_clients=True)
    try:
        server.start()
    except RuntimeError as e:
        server.cleanup()
        pytest.skip(f"no TLS server here: {e} when given the --tls-* options (built without TLS?)")
    base = {"host": "127.0.0.1", "port": server.port, "tls": True, "ssl_ca_certs": str(tls_files.ca),
            "ssl_cert_reqs": "required", "ssl_check_hostname": True, "client_name": "xml-pipeline:tls:"}
    try:
        with_cert = DirectConnection({**base, "ssl_certfile": str(tls_files.client_cert),
                                      "ssl_keyfile": str(tls_files.client_key)}, socket_timeout=5, connect_timeout=5)
        assert with_cert.pipeline(pack_commands([("PING",), ("CLIENT", "GETNAME")]), 2) == [b"PONG", b"xml-pipeline:tls:"]
        with_cert.disconnect()
        without = DirectConnection(base, socket_timeout=5, connect_timeout=5)
        with pytest.raises(Exception, match="(?i)certificate|closed|reset|EOF"):
            without.pipeline(pack_commands([("PING",)]), 1)
        without.disconnect()
    finally:
        server.cleanup()
