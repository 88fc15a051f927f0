"""How the Redis backend reaches its data: one server, a Sentinel-managed master, or a Redis Cluster.

The URL picks the mode (xml_pipeline.contract.parse_redis_url; docs/storage.md, "Which mode to
pick"). This module turns a BackendConfig into the redis-py objects of that mode, with the same
timeouts, pool size, client name and TLS as a single server:

- standalone: a BlockingConnectionPool from the URL (redis-py reads host, port, db, TLS, unix path);
- sentinel: a SentinelConnectionPool. Every new connection asks the sentinels for the current
  master, and a connection that meets a demoted master (READONLY) is dropped, so after a failover
  the same pool reconnects to the new master by itself;
- cluster: a RedisCluster client (redis_cluster_client.ClusterClient: key lookups that never pin a
  dead node; memory/redis_cluster.py builds the backend on it). It keeps the
  slot map, follows MOVED and ASK, and retries TRYAGAIN / CLUSTERDOWN / connection errors with
  backoff while a slot migrates or a replica is promoted.

Credentials come from the config (backend.redis_username / redis_password, XP_REDIS_USERNAME /
XP_REDIS_PASSWORD), never from a cluster or sentinel URL; the same user authenticates on every node.
Sentinels are asked without credentials unless `sentinel_auth` is set (a sentinel usually has no ACL
of its own).
"""
from __future__ import annotations

import ssl
from typing import Any

import redis
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.retry import Retry
from redis.sentinel import MasterNotFoundError, Sentinel

from .. import contract
from .config import BackendConfig

__all__ = ["cluster_client", "cluster_tls", "connection_pool", "failover_retries", "target", "wait_timeout_ms", "FAILOVER_RETRIES"]

#: Seconds between the cluster client's retries of a command that met a moving slot or a node
#: that is down: 20 ms * 2**k with jitter, at most 0.5 s.
_BACKOFF_BASE = 0.02
_BACKOFF_CAP = 0.5
#: How many times the cluster client retries one command (MOVED/ASK redirections are followed on
#: top of these, up to redis-py's request TTL of 16). With the backoff above this covers about
#: 8 s: longer than a replica takes to be promoted with cluster-node-timeout up to 5 s.
CLUSTER_RETRIES = 20
#: Retries of an idempotent operation on a cluster or a Sentinel-managed master (backend.retries
#: when that is larger). With the backend's jittered backoff (up to 20 ms * 2**k, at most 0.5 s)
#: they span about 7 s on average and at most 14 s: long enough for a replica to be promoted
#: (down-after-milliseconds / cluster-node-timeout plus the election), so a failover is a pause,
#: not an error. A standalone server keeps backend.retries (nothing is promoted there), and
#: `retries: 0` means no retries in every mode.
FAILOVER_RETRIES = 30


def wait_timeout_ms(config: BackendConfig) -> int:
    """WAIT's own timeout: half the socket timeout, so WAIT answers (with how many replicas it got)
    before the socket read gives up on it."""
    return max(1, int(config.socket_timeout * 500))


def failover_retries(config: BackendConfig) -> int:
    """How many times an idempotent operation is retried on `config`'s topology."""
    if contract.redis_mode(config.redis_url) == "standalone" or config.retries == 0:
        return config.retries  # 0 turns retries off in every mode
    return max(config.retries, FAILOVER_RETRIES)


def target(config: BackendConfig) -> contract.RedisTarget:
    """The mode, TLS and nodes of `config.redis_url` (validated by BackendConfig already)."""
    return contract.parse_redis_url(config.redis_url, "backend.redis_url")


def _common(config: BackendConfig, username: str | None, password: str | None) -> dict[str, Any]:
    return {
        "username": username,
        "password": password,
        "socket_connect_timeout": config.connect_timeout,
        "socket_timeout": config.socket_timeout,
        "socket_keepalive": True,
        "health_check_interval": config.health_check_interval,
        # Connections never retry on their own: the backend's retry policy decides what is safe to
        # repeat (an XADD is not).
        "retry": Retry(NoBackoff(), 0),
        "client_name": f"xml-pipeline:{config.redis_prefix}",
    }


def connection_pool(config: BackendConfig, url: str, username: str | None,
                    password: str | None, **tls: Any) -> redis.ConnectionPool:
    """The connection pool of a standalone or sentinel URL (`url` without userinfo); `tls` are the
    ssl_* settings of a TLS connection."""
    common = _common(config, username, password)
    if contract.redis_mode(url) == "standalone":
        return redis.BlockingConnectionPool.from_url(
            url, max_connections=config.max_connections,
            timeout=config.connect_timeout + config.socket_timeout,  # wait for a free pooled connection
            **common, **tls)
    where = target(config)
    if where.mode != "sentinel":
        raise ValueError(f"{config.redacted_url} is a {where.mode} URL: use cluster_client()")
    from redis.sentinel import SentinelConnectionPool
    sentinel_kwargs: dict[str, Any] = {
        "socket_connect_timeout": config.connect_timeout,
        "socket_timeout": config.socket_timeout,
        # One try per sentinel and question: the backend's own retries (with backoff) ask again.
        "retry": Retry(NoBackoff(), 0),
    }
    if where.tls:
        sentinel_kwargs.update(ssl=True, **tls)  # the same CA file and checks as the master's
    sentinel = _Sentinels(list(where.nodes), sentinel_kwargs=sentinel_kwargs)
    assert where.master_name is not None
    return SentinelConnectionPool(where.master_name, sentinel, ssl=where.tls,
                                  max_connections=config.max_connections,
                                  check_connection=False, **common, **(tls if where.tls else {}))


def cluster_tls(config: BackendConfig) -> dict[str, Any]:
    """The ssl_* settings of every connection to a rediss+cluster:// node (redis-py's and the pump's
    per-node pipes): verified as on one server, the certificate against the system's CAs (or the
    CA file of backend.redis_ca_cert), and the host name."""
    return {"ssl_cert_reqs": "required", "ssl_check_hostname": True, **config.tls_kwargs()}


class _Sentinels(Sentinel):
    """redis-py's Sentinel, with a "no master found" that says what the sentinels failed with in
    one short line (redis-py's names each sentinel by its client's repr), and, when every sentinel
    refused our TLS handshake because its certificate does not verify against the CA, has that
    error as its context: the backend then does not retry it (redis_core._retryable), as it does
    not for a single server."""

    def discover_master(self, service_name: str) -> tuple[str, int]:
        failures: list[Exception] = []
        for i, sentinel in enumerate(self.sentinels):
            try:
                masters = sentinel.sentinel_masters()
            except (redis.ConnectionError, redis.TimeoutError) as e:
                failures.append(e)
                continue
            state = masters.get(service_name)
            if state and self.check_master_state(state, service_name):
                # The sentinel that answered is asked first next time.
                self.sentinels[0], self.sentinels[i] = sentinel, self.sentinels[0]
                return state["ip"], state["port"]
        what = "; ".join(f"{type(e).__name__}: {e}" for e in failures) or "none names it as up"
        error = MasterNotFoundError(f"no sentinel named the master of {service_name!r} ({what})")
        rejected = [e.__context__ for e in failures if isinstance(e.__context__, ssl.SSLCertVerificationError)]
        if rejected and len(rejected) == len(self.sentinels):
            error.__context__ = rejected[0]
        raise error


def cluster_client(config: BackendConfig, username: str | None, password: str | None) -> Any:
    """A redis-py RedisCluster on the seed nodes of a cluster URL (RESP2, bytes replies)."""
    from redis.cluster import ClusterNode

    from .redis_cluster_client import ClusterClient
    where = target(config)
    if where.mode != "cluster":
        raise ValueError(f"{config.redacted_url} is not a cluster URL")
    common = _common(config, username, password)
    common.pop("retry")
    common.pop("health_check_interval")
    kwargs: dict[str, Any] = {"ssl": True, **cluster_tls(config)} if where.tls else {}
    return ClusterClient(
        startup_nodes=[ClusterNode(host, port) for host, port in where.nodes],
        max_connections=config.max_connections,
        # A slot without a master (during a failover) fails only the commands of that slot.
        require_full_coverage=False,
        # RESP2, as the standalone pool speaks: the replies the backend parses are the same.
        protocol=2,
        retry=Retry(ExponentialWithJitterBackoff(cap=_BACKOFF_CAP, base=_BACKOFF_BASE), CLUSTER_RETRIES),
        **common, **kwargs)
