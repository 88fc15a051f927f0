"""The backend contract suite, again on a Redis Cluster (3 masters) and on a Sentinel-managed master.

The tests are test_contract.py's and test_buffer_and_registry.py's own functions: only the backend
under them changes (`any_backend` and `make_backend` below), so the cluster and sentinel modes
promise exactly what the other backends do.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import secrets

import pytest

from xml_pipeline.memory import BackendConfig, SharedBackend
from xml_pipeline.memory.redis_backend import RedisBackend
from xml_pipeline.memory.redis_cluster import RedisClusterBackend

import test_buffer_and_registry as _buffer_tests
import test_contract as _contract

pytestmark = pytest.mark.cluster

MODES = ("cluster", "sentinel")
SIGNING_KEY = "library-tests-signing-key-0123456789"


@pytest.fixture
def make_backend(request: pytest.FixtureRequest) -> Iterator[Callable[..., SharedBackend]]:
    made: list[SharedBackend] = []

    def make(kind: str, **config: Any) -> SharedBackend:
        topology = request.getfixturevalue("shared_cluster" if kind == "cluster" else "shared_sentinel")
        config.setdefault("signing_key", SIGNING_KEY)
        config.setdefault("redis_prefix", f"cl{secrets.token_hex(5)}:")
        backend = RedisBackend(BackendConfig(backend_type="redis", redis_url=topology.url, **config))
        assert isinstance(backend, RedisClusterBackend) is (kind == "cluster")
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


@pytest.fixture(params=MODES)
def any_backend(request: pytest.FixtureRequest, make_backend: Callable[..., SharedBackend]) -> SharedBackend:
    return make_backend(request.param, redis_ttl=600)


def _tests_of(module: Any) -> dict[str, Any]:
    """The module's tests that take `any_backend` (re-collected here, on this module's fixtures)."""
    return {name: fn for name, fn in vars(module).items()
            if name.startswith("test_") and callable(fn)
            and "any_backend" in getattr(fn, "__code__", _NoCode).co_varnames[:fn.__code__.co_argcount]}


class _NoCode:
    co_varnames: tuple[str, ...] = ()


globals().update(_tests_of(_contract))
globals().update({f"{name}_buffer": fn for name, fn in _tests_of(_buffer_tests).items()})


@pytest.mark.parametrize("kind", MODES)
def test_ttl_slides_on_every_node(make_backend: Callable[..., SharedBackend], kind: str) -> None:
    # The chain keys and index buckets live in other slots than their threads on a cluster.
    _contract.test_ttl_slides_with_writes_and_takes_registry_entries_along(make_backend, kind)
