"""The shared Redis's nodes as the operator's admin reaches them: discovery, one client per node.

`NodeSet` turns XPO_SHARED_REDIS_URL into admin clients:

- one server (`redis://`, `rediss://`): one node, the URL's client (database included);
- Redis Cluster (`redis+cluster://`): every master and replica from CLUSTER NODES (nodes.py); the
  operator's own records (`{xp-operator}:...`, one hash slot) live on the master owning that slot;
- Sentinel (`redis+sentinel://.../<master>`): the master and its replicas as the sentinels report
  them; the records live on the master.

Discovery is repeated at most every `refresh_seconds` (a burst of reconciles shares one), and at once
after a connection to a node failed, so a failover or a resharding is followed at the next call.
Every node is logged into with the same admin user (XPO_SHARED_REDIS_USERNAME/PASSWORD): it must
exist on every node. Sentinels are asked without credentials, as the library's pods ask them.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.crc import key_slot
from redis.retry import Retry

from ..settings import OperatorSettings
from ..topology import Address, Topology, parse_url
from .nodes import Node, discover, masters
from .ownership import OWNERS_KEY

#: Seconds a discovered node list is reused.
REFRESH_SECONDS = 2.0


@dataclass(frozen=True)
class NodeFailure:
    """A node an operation could not reach (the others were done)."""

    node: str
    error: str


class NodeSet:
    """Admin clients of every node of the shared Redis. Thread-safe."""

    def __init__(self, settings: OperatorSettings, *, client: redis.Redis | None = None,
                 refresh_seconds: float = REFRESH_SECONDS, clock: Callable[[], float] = time.monotonic) -> None:
        if not settings.shared_redis_url:
            raise ValueError("NodeSet needs settings.shared_redis_url (XPO_SHARED_REDIS_URL)")
        self.settings = settings
        self.topology: Topology = parse_url("XPO_SHARED_REDIS_URL", settings.shared_redis_url)
        self.refresh_seconds = refresh_seconds
        self._clock = clock
        self._url_client = client
        self._clients: dict[str, redis.Redis] = {}
        self._lock = threading.Lock()
        self._nodes: list[Node] | None = None
        self._at = float("-inf")

    @property
    def clustered(self) -> bool:
        """More than one server to administer (a cluster or a Sentinel set)."""
        return self.topology.mode != "standalone"

    # -- clients -------------------------------------------------------------------------------------
    def url_client(self) -> redis.Redis:
        """The one server of a standalone URL (redis-py reads the URL: database, TLS)."""
        if self._url_client is None:
            s = self.settings
            self._url_client = redis.Redis.from_url(s.shared_redis_url or "", **self._common())
        return self._url_client

    def _common(self) -> dict[str, Any]:
        s = self.settings
        return {"username": s.shared_redis_username or None, "password": s.shared_redis_password,
                "socket_connect_timeout": 2.0, "socket_timeout": 10.0, "health_check_interval": 30,
                "client_name": "xml-pipeline-operator",
                "retry": Retry(ExponentialWithJitterBackoff(cap=0.5, base=0.05), 2),
                **self._ca()}

    def _ca(self) -> dict[str, Any]:
        """The CA of a TLS shared Redis (XPO_SHARED_REDIS_CA_FILE), for every node and the sentinels."""
        ca = self.settings.shared_redis_ca
        return {"ssl_ca_data": ca} if ca and self.topology.tls else {}

    def client(self, node: Node) -> redis.Redis:
        """The admin client of `node` (kept for the operator's lifetime)."""
        if not self.clustered:
            return self.url_client()
        with self._lock:
            c = self._clients.get(node.address)
            if c is None:
                c = self._clients[node.address] = redis.Redis(host=node.host, port=node.port, ssl=self.topology.tls,
                                                              **self._common())
            return c

    def _seed(self, address: Address) -> redis.Redis:
        return self.client(Node(address[0], address[1]))

    def _sentinel(self, address: Address) -> redis.Redis:
        return redis.Redis(host=address[0], port=address[1], ssl=self.topology.tls, socket_connect_timeout=2.0,
                           socket_timeout=5.0, **self._ca())

    # -- nodes ---------------------------------------------------------------------------------------
    def nodes(self, *, refresh: bool = False) -> list[Node]:
        """Every node (masters first). Raises nodes.DiscoveryError when no address answers."""
        if not self.clustered:
            host, port = self.topology.addresses[0]
            return [Node(host, port, "master")]
        with self._lock:
            if not refresh and self._nodes is not None and self._clock() - self._at < self.refresh_seconds:
                return list(self._nodes)
        found = discover(self.topology, self._seed, self._sentinel)
        with self._lock:
            self._nodes, self._at = found, self._clock()
            return list(found)

    def forget(self) -> None:
        """Discover again at the next call (after a node failed)."""
        with self._lock:
            self._at = float("-inf")

    def masters(self) -> list[Node]:
        return masters(self.nodes())

    def primary(self) -> redis.Redis:
        """Where the operator's records live: the one server, the Sentinel master, or the cluster
        master owning the hash slot of `{xp-operator}`."""
        if not self.clustered:
            return self.url_client()
        nodes = self.nodes()
        if self.topology.mode == "cluster":
            slot = key_slot(OWNERS_KEY.encode())
            owner = next((n for n in nodes if n.role == "master" and any(lo <= slot <= hi for lo, hi in n.slots)),
                         None)
            if owner is not None:
                return self.client(owner)
        return self.client(masters(nodes)[0])

    def describe(self) -> str:
        """The shared Redis for messages (no credentials)."""
        if not self.clustered:
            from xml_pipeline.memory.config import redact_url
            return redact_url(self.settings.shared_redis_url or "")
        return self.settings.shared_redis_url or ""

    def each(self, fn: Callable[[Node, redis.Redis], Any], nodes: list[Node] | None = None
             ) -> tuple[dict[str, Any], list[NodeFailure]]:
        """Run `fn` on every node (or `nodes`); results by address, and the nodes that could not be
        reached. Other redis errors propagate (an admin refused on a node is not to be hidden)."""
        results: dict[str, Any] = {}
        failures: list[NodeFailure] = []
        for node in (self.nodes() if nodes is None else nodes):
            try:
                results[node.address] = fn(node, self.client(node))
            except redis.AuthenticationError:
                raise  # the admin's credentials are refused there: a configuration error, not an outage
            except (redis.ConnectionError, redis.TimeoutError) as e:
                failures.append(NodeFailure(node.address, type(e).__name__))
        if failures and self.clustered:
            self.forget()
        return results, failures
