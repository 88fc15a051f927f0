"""Large values (a 1 MB slot, a 1.5 MB temp value) on the library's own Redis connections, on real
redis-servers.

- Packed without a copy: the large argument is a piece of its own in the packed command (the slot's
  own buffer), and what arrives is byte-exact, through the pump's pipe, a worker's direct
  connection and the pooled redis-py connections alike; a large slot is read on the direct
  connection.
- A write cut off mid-value (a proxy that forwards only the first bytes, then drops the connection)
  is an error for the caller, and the server stores nothing of it; a reply cut off mid-value is an
  error too, never a short value.
"""
from __future__ import annotations

import os
import secrets
import socket
import threading
from collections.abc import Iterator

import pytest
import redis
from redis_server import RedisServer

from xml_pipeline.errors import BackendError
from xml_pipeline.memory.config import BackendConfig
from xml_pipeline.memory.redis_backend import RedisBackend
from xml_pipeline.memory.redis_pipe import RedisPipe, Unsure
from xml_pipeline.memory.redis_wire import LARGE_ARG, pieces

KEY = "large-values-signing-key-0123456789abcdef"
SLOT = os.urandom(1024 * 1024 + 7)
VALUE = os.urandom(1536 * 1024 + 3)


def backend_at(url: str, prefix: str, **config: object) -> RedisBackend:
    cfg: dict[str, object] = dict(backend_type="redis", redis_url=url, redis_prefix=prefix, signing_key=KEY,
                                  redis_ttl=600, socket_timeout=2.0, connect_timeout=1.0)
    cfg.update(config)
    return RedisBackend(BackendConfig(**cfg))  # type: ignore[arg-type]


def tid() -> str:
    return secrets.token_hex(16)


class CuttingProxy:
    """A TCP proxy to `port` that forwards at most `up` bytes client → server and `down` bytes
    server → client per connection, then drops both sides (None: no limit)."""

    def __init__(self, port: int, *, up: int | None = None, down: int | None = None) -> None:
        self._target = ("127.0.0.1", port)
        self._limits = (up, down)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.cut = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self._target)
            pair = (client, server)
            threading.Thread(target=self._copy, args=(client, server, self._limits[0], pair), daemon=True).start()
            threading.Thread(target=self._copy, args=(server, client, self._limits[1], pair), daemon=True).start()

    def _copy(self, src: socket.socket, dst: socket.socket, limit: int | None, pair: tuple[socket.socket, ...]) -> None:
        sent = 0
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if limit is not None and sent + len(data) >= limit:
                    dst.sendall(data[:limit - sent])
                    self.cut += 1
                    break
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        for s in pair:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self._listener.close()


@pytest.fixture
def raw(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis(host="127.0.0.1", port=redis_server.port)
    yield client
    client.close()


def test_large_arguments_are_pieces_of_their_own_buffers(redis_server: RedisServer) -> None:
    backend = backend_at(redis_server.url, f"lv{secrets.token_hex(4)}:")
    try:
        packed, count = backend.pack_append_at(tid(), SLOT, 0, max_slots=None, append_id="a1",
                                               items=[(tid(), VALUE), (tid(), b"small")])
        assert count == 3 and isinstance(packed, list)
        large = [p for p in packed if isinstance(p, memoryview)]
        assert [p.obj for p in large] == [SLOT, VALUE]  # the callers' buffers, not copies
        assert all(len(p) <= LARGE_ARG for p in packed if not isinstance(p, memoryview))
        small, _ = backend.pack_append_at(tid(), b"x" * LARGE_ARG, 0, max_slots=None, append_id="a2", items=[])
        assert type(small) is bytes  # small commands stay one buffer
        # Pieces written back to back are the commands redis-py's packer would write.
        sets = backend._pack_sets(["k"], [SLOT])  # noqa: SLF001 - the packer under test
        assert isinstance(sets, list)
        assert b"".join(bytes(p) for p in sets) == b"".join(redis.Connection().pack_command("SET", "k", SLOT, "EX", 600))
        head = backend._script_heads["append"]  # noqa: SLF001
        assert b"".join(bytes(p) for p in pieces(head, packed[:0] or [b"a", SLOT, b"b"])) == head + b"a" + SLOT + b"b"
    finally:
        backend.close()


async def test_large_values_through_the_pipe_are_byte_exact(redis_server: RedisServer, raw: redis.Redis) -> None:
    prefix = f"lv{secrets.token_hex(4)}:"
    backend = backend_at(redis_server.url, prefix)
    pipe = RedisPipe(backend)
    try:
        backend.buffer_append(tid(), backend.signer.sign(b"warm-up"))  # scripts loaded
        thread, key = tid(), tid()
        outcome = await pipe.append_at(thread, SLOT, 0, max_slots=None, append_id="big",
                                       items=[(key, VALUE)])
        assert outcome.status == "stored" and outcome.position == 0
        assert raw.lindex(backend.keys.buffer(thread), 0) == SLOT
        assert raw.get(backend.keys.tmp(key)) == VALUE
        assert await pipe.take(key) == VALUE
        # Small and large commands of one loop iteration share the write, in order.
        outcomes = [await pipe.append_at(thread, s, i + 1, max_slots=None, append_id=f"s{i}", items=[])
                    for i, s in enumerate([b"small", SLOT[:LARGE_ARG + 1]])]
        assert [o.position for o in outcomes] == [1, 2]
        assert raw.lrange(backend.keys.buffer(thread), 0, -1) == [SLOT, b"small", SLOT[:LARGE_ARG + 1]]
    finally:
        pipe.close()
        backend.close()


@pytest.mark.parametrize("direct", [True, False], ids=["direct-connection", "pool"])
def test_large_values_through_the_blocking_backend_are_byte_exact(redis_server: RedisServer, raw: redis.Redis,
                                                                  direct: bool) -> None:
    prefix = f"lv{secrets.token_hex(4)}:"
    backend = backend_at(redis_server.url, prefix)
    try:
        if direct:
            backend.use_direct_connection()
        thread, key = tid(), tid()
        assert backend.buffer_append(thread, SLOT) == 0
        assert backend.buffer_append_at(thread, SLOT[::-1], 1, items=[(key, VALUE)]).position == 1
        before = backend._direct.round_trips if direct else 0  # noqa: SLF001
        assert backend.buffer_get_slot(thread, 0) == SLOT
        assert backend.buffer_get_slot(thread, 1) == SLOT[::-1]
        assert backend.buffer_get_slot(thread, 2) is None
        if direct:
            assert backend._direct.round_trips == before + 3  # noqa: SLF001 - read on the direct connection
        assert backend.temp_get_many([key]) == [VALUE]
        assert raw.lrange(backend.keys.buffer(thread), 0, -1) == [SLOT, SLOT[::-1]]
    finally:
        backend.close()


@pytest.mark.parametrize("path", ["direct-connection", "pool"])
def test_a_write_cut_off_mid_value_is_an_error_and_stores_nothing(redis_server: RedisServer, raw: redis.Redis,
                                                                  path: str) -> None:
    proxy = CuttingProxy(redis_server.port, up=512 * 1024)
    prefix = f"lv{secrets.token_hex(4)}:"
    backend = backend_at(f"redis://127.0.0.1:{proxy.port}/0", prefix, retries=1)
    try:
        if path == "direct-connection":
            backend.use_direct_connection()
        backend.buffer_append(tid(), b"warm-up")  # small commands pass the proxy
        thread, key = tid(), tid()
        with pytest.raises(BackendError):
            backend.buffer_append_at(thread, SLOT, 0, items=[(key, VALUE)])
        assert proxy.cut >= 2  # the first attempt and its retry were both cut off
        assert raw.exists(backend.keys.buffer(thread), backend.keys.tmp(key)) == 0
    finally:
        backend.close()
        proxy.close()


async def test_a_pipe_write_cut_off_mid_value_is_unsure_and_stores_nothing(redis_server: RedisServer,
                                                                          raw: redis.Redis) -> None:
    proxy = CuttingProxy(redis_server.port, up=512 * 1024)
    prefix = f"lv{secrets.token_hex(4)}:"
    backend = backend_at(f"redis://127.0.0.1:{proxy.port}/0", prefix, retries=0)
    pipe = RedisPipe(backend)
    try:
        backend.buffer_append(tid(), b"warm-up")
        thread, key = tid(), tid()
        with pytest.raises(Unsure):
            await pipe.append_at(thread, SLOT, 0, max_slots=None, append_id="cut", items=[(key, VALUE)])
        assert proxy.cut >= 1
        assert raw.exists(backend.keys.buffer(thread), backend.keys.tmp(key)) == 0
    finally:
        pipe.close()
        backend.close()
        proxy.close()


@pytest.mark.parametrize("path", ["direct-connection", "pool"])
def test_a_reply_cut_off_mid_value_is_an_error_not_a_short_value(redis_server: RedisServer, path: str) -> None:
    prefix = f"lv{secrets.token_hex(4)}:"
    writer = backend_at(redis_server.url, prefix)
    proxy = CuttingProxy(redis_server.port, down=512 * 1024)
    reader = backend_at(f"redis://127.0.0.1:{proxy.port}/0", prefix, retries=1)
    try:
        thread = tid()
        writer.buffer_append(thread, SLOT)
        if path == "direct-connection":
            reader.use_direct_connection()
        assert reader.buffer_thread_len(thread) == 1  # small replies pass the proxy
        with pytest.raises(BackendError):
            reader.buffer_get_slot(thread, 0)
        assert proxy.cut >= 2
    finally:
        writer.close()
        reader.close()
        proxy.close()
