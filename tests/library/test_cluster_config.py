"""Cluster and sentinel URLs: what contract.parse_redis_url accepts, and the errors (naming the
field or variable and the allowed forms) for everything else. No server needed."""
from __future__ import annotations

import subprocess
import sys

import pytest
import redis

from xml_pipeline import contract
from xml_pipeline.errors import ConfigError
from xml_pipeline.memory import BackendConfig


@pytest.mark.parametrize("url, mode, tls, nodes, master", [
    ("redis+cluster://a:7000,b:7001", "cluster", False, (("a", 7000), ("b", 7001)), None),
    ("rediss+cluster://redis-0.redis:6380", "cluster", True, (("redis-0.redis", 6380),), None),
    ("redis+cluster://a", "cluster", False, (("a", 6379),), None),
    ("redis+cluster://[::1]:7000,10.0.0.2", "cluster", False, (("::1", 7000), ("10.0.0.2", 6379)), None),
    ("redis+sentinel://s1,s2:26380/mymaster", "sentinel", False, (("s1", 26379), ("s2", 26380)), "mymaster"),
    ("rediss+sentinel://s1:26379/my-master.1", "sentinel", True, (("s1", 26379),), "my-master.1"),
    ("redis://localhost:6379/0", "standalone", False, (), None),
    ("rediss://h", "standalone", True, (), None),
    ("unix:///run/redis.sock", "standalone", False, (), None),
])
def test_urls_name_their_mode_and_nodes(url: str, mode: str, tls: bool, nodes: tuple[tuple[str, int], ...],
                                        master: str | None) -> None:
    target = contract.parse_redis_url(url)
    assert (target.mode, target.tls, target.nodes, target.master_name) == (mode, tls, nodes, master)
    config = BackendConfig(backend_type="redis", redis_url=url)
    assert config.redis_mode == mode == contract.redis_mode(url)


@pytest.mark.parametrize("url, fragment", [
    ("redis+cluster://user:secret-pw@a:7000", "may not carry credentials"),
    ("redis+cluster://a:7000,,b:7001", "empty node"),
    ("redis+cluster://a:99999", "port '99999'"),
    ("redis+cluster://a:", "empty port"),
    ("redis+cluster://a:7000/3", "only database 0"),
    ("redis+cluster://a:7000?timeout=1", "no query"),
    ("redis+cluster://", "empty node"),
    ("redis+cluster://[::1:7000", "malformed"),
    ("redis+sentinel://s1:26379", "names no master"),
    ("redis+sentinel://s1:26379/", "names no master"),
    ("redis+sentinel://s1:26379/my master", "is not valid"),
    ("redis+sentinel://s1:26379/a/b", "is not valid"),
    ("redis+cluster+sentinel://a", "scheme"),
    ("rediss+tls://a", "scheme"),
])
def test_bad_cluster_and_sentinel_urls_name_the_field_and_the_forms(url: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        BackendConfig(backend_type="redis", redis_url=url)
    error = info.value
    assert error.field == "backend.redis_url" and fragment in str(error), str(error)
    assert "secret-pw" not in str(error)
    assert error.allowed  # every URL error says what is allowed


def test_the_environment_variable_is_named() -> None:
    with pytest.raises(ConfigError) as info:
        BackendConfig().with_env_overrides({"XP_REDIS_URL": "redis+sentinel://s1"})
    assert info.value.field == "XP_REDIS_URL" and "master" in str(info.value)
    ok = BackendConfig().with_env_overrides({"XP_REDIS_URL": "redis+cluster://a:1,b:2"})
    assert ok.redis_mode == "cluster"


@pytest.mark.parametrize("value", [-1, 17, "1", True, 1.0])
def test_wait_replicas_is_a_small_whole_number(value: object) -> None:
    with pytest.raises(ConfigError) as info:
        BackendConfig(redis_wait_replicas=value)  # type: ignore[arg-type]
    assert info.value.field == "backend.redis_wait_replicas" and "0..16" in str(info.value)


def test_wait_replicas_from_organism_yaml() -> None:
    config = BackendConfig.from_dict({"type": "redis", "redis_url": "redis+cluster://a:1", "redis_wait_replicas": 1})
    assert config.redis_wait_replicas == 1


def test_the_cli_says_one_line_for_a_bad_url() -> None:
    out = subprocess.run([sys.executable, "-m", "xml_pipeline.cli", "backend", "info"],
                         env={"XP_BACKEND_TYPE": "redis", "XP_REDIS_URL": "redis+sentinel://s1:26379",
                              "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out
    assert "Traceback" not in out.stderr and "XP_REDIS_URL" in out.stderr and "master" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_sentinel_over_tls_verifies_like_one_server() -> None:
    """rediss+sentinel://: TLS to the sentinels and to the master, the certificate checked against the
    system's CAs and the host name, as for rediss:// (nothing connects here)."""
    from redis.sentinel import SentinelManagedSSLConnection

    from xml_pipeline.memory.redis_backend import RedisBackend
    backend = RedisBackend(BackendConfig(backend_type="redis", redis_url="rediss+sentinel://127.0.0.1:1/m",
                                         signing_key="tls-config-tests-key-0123456789"))
    pool = backend._pool  # noqa: SLF001 - what the connections are made from
    assert pool.connection_class is SentinelManagedSSLConnection
    assert pool.connection_kwargs["ssl_cert_reqs"] == "required" and pool.connection_kwargs["ssl_check_hostname"]
    sentinel_kwargs = pool.sentinel_manager.sentinel_kwargs  # type: ignore[attr-defined]
    assert sentinel_kwargs["ssl"] is True and sentinel_kwargs["ssl_cert_reqs"] == "required"
    # No sentinel answers (nothing listens on port 1): the fast path is still offered, and its
    # connections ask the sentinels when they connect (a connection error then, not a crash now).
    assert backend.pipe_capable() and backend.connection_kwargs()["host"] is None
    direct = backend.new_direct_connection()
    assert direct is not None
    with pytest.raises(redis.ConnectionError, match="sentinel"):
        direct.pipeline(backend.pack_commands([("PING",)]), 1)
    backend.close()
