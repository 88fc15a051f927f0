"""Every node of the shared Redis: ACL users live per node, so the operator administers each one.

Redis does not replicate ACL users, not even to a master's own replicas (ACL SETUSER is not written to
the replication stream). On a Redis Cluster or a Sentinel set an organism's user must therefore be
made, rotated and removed on every node that can serve its pods: every master and every replica of a
cluster (a replica is promoted on failover; the pods may also read there), the master and replicas
of a Sentinel set. The nodes are discovered from the URL's addresses:

- cluster: `CLUSTER NODES` of the first seed that answers (masters and replicas, with their ids;
  nodes flagged `fail`, `handshake` or `noaddr` are skipped: they cannot be reached);
- sentinel: `SENTINEL GET-MASTER-ADDR-BY-NAME <name>` (the master clients are sent to; during a
  failover it already names the promoted replica, where SENTINEL MASTER still shows the old one) and
  `SENTINEL REPLICAS <name>` of the first sentinel that answers (replicas a sentinel sees as down or
  disconnected are skipped).

The parsers are pure (tested on text); `discover` does the round trips. Nodes are named by the
address they announce (`host:port`): the operator must reach that address, so announce addresses it
can route to (`cluster-announce-ip` / `replica-announce-ip` behind NAT).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import redis

from ..topology import Address, Topology, format_address

Role = Literal["master", "replica"]
_UNREACHABLE_FLAGS = frozenset({"fail", "handshake", "noaddr"})
_DOWN_FLAGS = frozenset({"s_down", "o_down", "disconnected"})


class DiscoveryError(Exception):
    """No seed or sentinel answered, or the master name is unknown to every sentinel."""


@dataclass(frozen=True, order=True)
class Node:
    host: str
    port: int
    role: Role = "master"
    #: Cluster node id (empty for a Sentinel set or one server).
    node_id: str = ""
    #: A cluster master's slot ranges, inclusive (slots being migrated are not listed).
    slots: tuple[tuple[int, int], ...] = field(default=(), compare=False)

    @property
    def address(self) -> str:
        return format_address((self.host, self.port))


def parse_cluster_nodes(text: str) -> list[Node]:
    """Masters and replicas from CLUSTER NODES output, in a stable order (masters first, by address).

    A line: `<id> <ip:port@cport[,hostname]> <flags> <master-id> <ping> <pong> <epoch> <link> <slots...>`.
    """
    nodes: list[Node] = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 8:
            continue
        node_id, addr, flags = fields[0], fields[1], set(fields[2].split(","))
        if flags & _UNREACHABLE_FLAGS or "fail?" in flags:
            continue
        hostport = addr.split("@", 1)[0]
        host, _, port = hostport.rpartition(":")
        if not host or not port.isdigit() or int(port) == 0:
            continue
        role: Role = "master" if "master" in flags else "replica"
        nodes.append(Node(host.strip("[]"), int(port), role, node_id, _slot_ranges(fields[8:])))
    return sorted(nodes, key=lambda n: (n.role != "master", n.host, n.port))


def _slot_ranges(fields: list[str]) -> tuple[tuple[int, int], ...]:
    """`0-5460`, `5461` -> ranges; `[slot->-id]` / `[slot-<-id]` (a migration in progress) skipped."""
    out = []
    for f in fields:
        lo, _, hi = f.partition("-")
        if lo.isdigit() and (not hi or hi.isdigit()):
            out.append((int(lo), int(hi or lo)))
    return tuple(out)


def pairs(reply: Any) -> dict[str, Any]:
    """A Sentinel reply (a flat list of name, value, ... or a mapping) as {str: str}."""
    if isinstance(reply, Mapping):
        return {_s(k): _s(v) if isinstance(v, (bytes, str)) else v for k, v in reply.items()}
    items = list(reply or [])
    return {_s(items[i]): _s(items[i + 1]) for i in range(0, len(items) - 1, 2)}


def parse_sentinel(master: Any, replicas: Iterable[Any]) -> list[Node]:
    """The master and its reachable replicas from SENTINEL GET-MASTER-ADDR-BY-NAME (`[ip, port]`)
    and SENTINEL REPLICAS replies."""
    if not master or len(master) != 2:
        raise DiscoveryError("the sentinel does not know the master's address")
    first = Node(_s(master[0]), int(master[1]), "master")
    nodes = []
    for raw in replicas:
        r = pairs(raw)
        flags = set(str(r.get("flags", "")).split(","))
        if flags & _DOWN_FLAGS or "ip" not in r or "port" not in r:
            continue
        node = Node(r["ip"], int(r["port"]), "replica")
        if node.address != first.address:  # the promoted replica, still listed during a failover
            nodes.append(node)
    return [first, *sorted(nodes)]


def discover(top: Topology, connect: Callable[[Address], redis.Redis],
             connect_sentinel: Callable[[Address], redis.Redis] | None = None) -> list[Node]:
    """The nodes of `top`, asking its addresses in order until one answers. Raises DiscoveryError
    (with each address's failure) when none does; redis errors other than connection failures
    (an admin without permission, say) propagate."""
    if top.mode == "standalone":
        host, port = top.addresses[0]
        return [Node(host, port, "master")]
    failures: list[str] = []
    for address in top.addresses:
        try:
            if top.mode == "cluster":
                client = connect(address)
                reply = client.execute_command("CLUSTER", "NODES")
                nodes = parse_cluster_nodes(_s(reply) if isinstance(reply, (bytes, str)) else _join(reply))
            else:
                assert top.master_name is not None
                client = (connect_sentinel or connect)(address)
                master = client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", top.master_name)
                replicas = client.execute_command("SENTINEL", "REPLICAS", top.master_name)
                nodes = parse_sentinel(master, replicas or [])
        except redis.AuthenticationError:
            raise  # the admin is refused: say so, not "unreachable"
        except (redis.ConnectionError, redis.TimeoutError, OSError) as e:
            failures.append(f"{format_address(address)}: {type(e).__name__}")
            continue
        except DiscoveryError as e:
            failures.append(f"{format_address(address)}: {e}")
            continue
        except redis.ResponseError as e:
            if "no such master" in str(e).lower() or "unknown" in str(e).lower():
                failures.append(f"{format_address(address)}: {str(e)[:120]}")
                continue
            raise
        if nodes:
            return nodes
        failures.append(f"{format_address(address)}: no reachable node listed")
    what = "seed" if top.mode == "cluster" else "sentinel"
    raise DiscoveryError(f"no {what} answered ({'; '.join(failures)})")


def masters(nodes: Sequence[Node]) -> list[Node]:
    return [n for n in nodes if n.role == "master"]


def _join(reply: Any) -> str:
    """CLUSTER NODES as some client versions hand it back (a mapping by address, or lines)."""
    if isinstance(reply, Mapping):
        return "\n".join(_s(v) if isinstance(v, (bytes, str)) else "" for v in reply.values())
    return "\n".join(_s(x) for x in reply)


def _s(v: Any) -> str:
    return v.decode("utf-8", "replace") if isinstance(v, (bytes, bytearray)) else str(v)
