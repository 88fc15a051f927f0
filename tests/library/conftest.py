"""Fixtures of the library tests: every backend kind, built the same way, cleaned up after.

`any_backend` runs a test on memory, manager (a private server process) and redis (the session's
real redis-server, a unique prefix per test). Tests that need a special config (a short TTL, say)
use `make_backend(kind, **config)`.
"""
from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from redis_server import RedisServer

from xml_pipeline.memory import BackendConfig, InMemoryBackend, ManagerBackend, SharedBackend

KINDS = ("memory", "manager", "redis")
SIGNING_KEY = "library-tests-signing-key-0123456789"


def unique_prefix(tag: str = "lt") -> str:
    return f"{tag}{secrets.token_hex(5)}:"


def redis_backend_class() -> Any:
    """RedisBackend, or skip (it lives in redis_backend.py, written alongside this suite)."""
    try:
        from xml_pipeline.memory.redis_backend import RedisBackend
    except ImportError as e:  # pragma: no cover - only while the Redis part is missing
        pytest.skip(f"RedisBackend is not importable yet: {e}")
    return RedisBackend


MakeBackend = Callable[..., SharedBackend]


@pytest.fixture
def make_backend(request: pytest.FixtureRequest) -> Iterator[MakeBackend]:
    """make_backend(kind, **config) -> a fresh backend of that kind, closed at teardown."""
    made: list[SharedBackend] = []

    def make(kind: str, **config: Any) -> SharedBackend:
        config.setdefault("signing_key", SIGNING_KEY)
        backend: SharedBackend
        if kind == "memory":
            backend = InMemoryBackend(BackendConfig(backend_type="memory", **config))
        elif kind == "manager":
            backend = ManagerBackend(BackendConfig(backend_type="manager", **config))
        elif kind == "redis":
            cls = redis_backend_class()
            server: RedisServer = request.getfixturevalue("redis_server")
            config.setdefault("redis_prefix", unique_prefix())
            backend = cls(BackendConfig(backend_type="redis", redis_url=server.url, **config))
        else:  # pragma: no cover
            raise ValueError(kind)
        made.append(backend)
        return backend

    yield make
    for backend in made:
        try:
            if backend.ping():
                backend.buffer_clear()
                backend.registry_clear()
        finally:
            backend.close()


@pytest.fixture
def raw(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A plain redis-py client on the session's redis-server, to look at keys behind the backend."""
    client = redis_server.client()
    yield client
    client.close()


@pytest.fixture(scope="session")
def shared_manager() -> Iterator[ManagerBackend]:
    """One manager server for the contract tests (per xdist worker); each test gets a new client."""
    owner = ManagerBackend(BackendConfig(backend_type="manager", redis_ttl=600, signing_key=SIGNING_KEY))
    yield owner
    owner.close()


@pytest.fixture(params=KINDS)
def any_backend(request: pytest.FixtureRequest, make_backend: MakeBackend) -> Iterator[SharedBackend]:
    """The same test on every backend kind (TTL 600 s)."""
    if request.param != "manager":
        yield make_backend(request.param, redis_ttl=600)
        return
    owner: ManagerBackend = request.getfixturevalue("shared_manager")
    client = ManagerBackend(owner.client_config())
    client.buffer_clear()
    client.registry_clear()
    yield client
    client.close()
