"""Fixtures shared by every test area: real server processes (Redis or Valkey, see redis_server.py)."""
from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from redis_server import RedisServer, TLSFiles, TLSRedisServer, make_tls_files, server_binary  # noqa: E402

if TYPE_CHECKING:
    from redis_cluster import LocalCluster, LocalSentinel


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Name the server the run used (also under -q), so a report says whether it was Redis or Valkey."""
    try:
        terminalreporter.write_line(f"server: {server_binary()}")
    except RuntimeError as e:
        terminalreporter.write_line(f"server: none ({e})")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One real redis-server for the session (per xdist worker). Tests use their own prefixes."""
    server = RedisServer().start()
    yield server
    server.cleanup()


@pytest.fixture
def fresh_redis() -> Iterator[RedisServer]:
    """A private redis-server for tests that stop, restart or reconfigure it."""
    server = RedisServer().start()
    yield server
    server.cleanup()


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    """A private CA with a server certificate for 127.0.0.1 / localhost and a client certificate
    (redis_server.make_tls_files), made once per session (per xdist worker)."""
    return make_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="session")
def tls_redis(tls_files: TLSFiles) -> Iterator[TLSRedisServer]:
    """One redis-server that speaks only TLS (rediss://127.0.0.1:PORT/0) with a certificate of
    `tls_files.ca`, for the session. Skipped where the server binary was built without TLS."""
    server = TLSRedisServer(tls_files)
    try:
        server.start()
    except RuntimeError as e:
        server.cleanup()
        pytest.skip(f"no TLS server here: {e} when given the --tls-* options (built without TLS?)")
    yield server
    server.cleanup()


@pytest.fixture
def redis_factory() -> Iterator[type[RedisServer]]:
    """Start extra servers with custom options; all are cleaned up at teardown."""
    started: list[RedisServer] = []

    class _Factory(RedisServer):
        def __init__(self, **kw: object) -> None:
            super().__init__(**kw)  # type: ignore[arg-type]
            started.append(self)

    yield _Factory
    for s in started:
        s.cleanup()


@pytest.fixture
def redis_cluster() -> Iterator["LocalCluster"]:
    """A private local Redis Cluster: 3 masters + 3 replicas (tests may kill, restart, reshard)."""
    from redis_cluster import start_cluster

    cluster = start_cluster()
    yield cluster
    cluster.close()


@pytest.fixture
def redis_sentinel() -> Iterator["LocalSentinel"]:
    """A private Sentinel set: 1 master, 1 replica, 3 sentinels (tests may fail the master over)."""
    from redis_cluster import start_sentinel

    local = start_sentinel()
    yield local
    local.close()


@pytest.fixture(scope="session")
def shared_cluster() -> Iterator["LocalCluster"]:
    """One local Redis Cluster for the session (per xdist worker), for tests that leave every node
    running and use prefixes of their own (the cluster contract suite, resharding)."""
    from redis_cluster import start_cluster

    cluster = start_cluster()
    yield cluster
    cluster.close()


@pytest.fixture(scope="session")
def shared_sentinel() -> Iterator["LocalSentinel"]:
    """One Sentinel set for the session (per xdist worker), for tests that do not fail it over."""
    from redis_cluster import start_sentinel

    local = start_sentinel()
    yield local
    local.close()


def _tls_sets_or_skip(tls_files: TLSFiles) -> None:
    """Skip with the reason where this server binary cannot run a TLS cluster / Sentinel set."""
    from redis_cluster import cluster_supported, tls_unsupported

    reason = cluster_supported() or tls_unsupported(tls_files)
    if reason:
        pytest.skip(f"no TLS cluster or Sentinel set here: {reason}")


@pytest.fixture(scope="module")
def tls_cluster(tls_files: TLSFiles) -> Iterator["LocalCluster"]:
    """A TLS-only local Redis Cluster (3 masters + 3 replicas; clients, the cluster bus and
    replication all on TLS with a certificate of `tls_files.ca`), one per test module: tests that
    kill a master come last in their module. Skipped where the server binary lacks TLS."""
    from redis_cluster import start_cluster

    _tls_sets_or_skip(tls_files)
    cluster = start_cluster(tls=tls_files)
    yield cluster
    cluster.close()


@pytest.fixture(scope="module")
def tls_sentinel(tls_files: TLSFiles) -> Iterator["LocalSentinel"]:
    """A TLS-only Sentinel set (1 master, 1 replica, 3 sentinels; replication and the sentinels'
    links on TLS too), one per test module: tests that fail it over come last in their module.
    Skipped where the server binary lacks TLS."""
    from redis_cluster import start_sentinel

    _tls_sets_or_skip(tls_files)
    local = start_sentinel(tls=tls_files)
    yield local
    local.close()
