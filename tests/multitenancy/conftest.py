"""Fixtures for the multi-tenancy tests: a shared redis-server with an admin password, and
organism users confined to their prefixes (made by the code under test, tenancy.acl)."""
from __future__ import annotations

import itertools
import secrets
import signal
import subprocess
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pytest
import redis
from redis_server import RedisServer

if TYPE_CHECKING:
    from redis_cluster import LocalCluster, LocalSentinel

from xml_pipeline_operator.tenancy import acl, functions

ADMIN_PASSWORD = "admin-" + secrets.token_hex(8)
_seq = itertools.count()


@dataclass(frozen=True)
class Org:
    """An organism's credentials on the shared Redis."""

    server: RedisServer
    username: str
    password: str
    prefix: str

    def client(self, **kw: object) -> redis.Redis:
        """A client logged in as this organism's user (never the admin)."""
        opts: dict[str, object] = {"socket_timeout": 5, **kw}
        return redis.Redis.from_url(self.server.url, username=self.username, password=self.password,
                                    **opts)  # type: ignore[arg-type]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """In test_contract_restricted.py, keep the contract tests' "redis" parametrizations only."""
    keep, drop = [], []
    for item in items:
        callspec = getattr(item, "callspec", None)
        kind = callspec.params.get("kind") if callspec is not None else None
        if item.module is not None and item.module.__name__.endswith("test_contract_restricted") \
                and kind not in (None, "redis"):
            drop.append(item)
        else:
            keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(scope="session")
def shared_redis() -> Iterator[RedisServer]:
    """The shared Redis of many organisms; the `default` user is the operator's admin. The function
    library tenants FCALL is loaded, as the operator does before it makes the first user."""
    server = RedisServer(password=ADMIN_PASSWORD).start()
    admin = server.client()
    functions.ensure_library(admin)
    admin.close()
    yield server
    server.cleanup()


@pytest.fixture
def admin(shared_redis: RedisServer) -> Iterator[redis.Redis]:
    client = shared_redis.client()
    yield client
    client.close()


@pytest.fixture
def make_org(shared_redis: RedisServer, admin: redis.Redis) -> Iterator[Callable[..., Org]]:
    """Create organism users with unique prefixes on the shared Redis; removed with their keys after."""
    made: list[Org] = []

    def make(name: str | None = None, *, prefix: str | None = None, server: RedisServer | None = None) -> Org:
        n = next(_seq)
        name = name or f"org{n}"
        srv = server or shared_redis
        org = Org(srv, acl.username_for("t", f"{name}-{n}"), secrets.token_urlsafe(24),
                  prefix or f"xp:t.{name}-{n}:")
        adm = admin if srv is shared_redis else srv.client()
        acl.ensure_user(adm, org.username, org.password, org.prefix)
        functions.ensure_library(adm)
        if adm is not admin:
            adm.close()
        made.append(org)
        return org

    yield make
    for org in made:
        if org.server is shared_redis and org.server.proc is not None:
            admin.execute_command("ACL", "DELUSER", org.username)
            keys = list(admin.scan_iter(match=f"{org.prefix}*", count=1000))
            if keys:
                admin.unlink(*keys)


def stop_gracefully(procs: Iterable[subprocess.Popen[bytes]], timeout: float = 20) -> list[tuple[int, str]]:
    """Stop pods' processes as Kubernetes does: SIGTERM to all, then wait for each (SIGKILL after
    `timeout`). Returns each one's exit code and stderr (empty when it was not piped)."""
    procs = list(procs)
    for p in procs:
        p.send_signal(signal.SIGTERM)
    results = []
    for p in procs:
        try:
            _out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            _out, err = p.communicate()
        results.append((p.returncode, (err or b"").decode(errors="replace")))
    return results


@pytest.fixture(scope="module")
def cluster(request: pytest.FixtureRequest) -> Iterator["LocalCluster"]:
    """One local cluster per module (its tests use distinct organisms); the admin is `default` with
    the module's ADMIN_PASSWORD."""
    from redis_cluster import start_cluster

    c = start_cluster(password=request.module.ADMIN_PASSWORD)
    yield c
    c.close()


@pytest.fixture(scope="module")
def sentinel_set(request: pytest.FixtureRequest) -> Iterator["LocalSentinel"]:
    """One local Sentinel set per module, its data nodes protected by the module's ADMIN_PASSWORD."""
    from redis_cluster import start_sentinel

    s = start_sentinel(password=request.module.ADMIN_PASSWORD)
    yield s
    s.close()
