"""Real Redis Cluster and Sentinel sets on loopback for the cluster tests (marker `cluster`).

- `ClusterSet`: 3 masters + 3 replicas (`--cluster-enabled yes`), slots assigned and nodes joined with
  CLUSTER ADDSLOTSRANGE / MEET / REPLICATE (what `redis-cli --cluster create` sends), node timeout 1 s
  so a killed master's replica is promoted within about 2 s. `migrate_slot` moves one slot with its
  keys (CLUSTER SETSLOT IMPORTING / MIGRATING, MIGRATE, SETSLOT NODE: a resharding, one slot at a
  time, as `redis-cli --cluster reshard` does it).
- `SentinelSet`: 1 master, 1 replica, 3 sentinels (quorum 2, down-after 1 s).

Every process is a child of the test process, in its own temp dir, killed at cleanup.
"""
from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import redis
from redis_server import RedisServer, free_port, server_binary

NODE_TIMEOUT_MS = 1000
_SLOTS = 16384


def _wait(what: str, check: object, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            if check():  # type: ignore[operator]
                return
        except redis.RedisError as e:
            last = e
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {what} ({last})")


class ClusterSet:
    """masters[i] serves slot range i; replicas[i] replicates masters[i] (until a failover)."""

    def __init__(self, masters: int = 3, replicas_per_master: int = 1) -> None:
        args = ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", str(NODE_TIMEOUT_MS), "--cluster-require-full-coverage", "no")
        # The bus port is named: the default (port + 10000) may not exist for a high free port.
        self.bus_ports = [free_port() for _ in range(masters * (1 + replicas_per_master))]
        self.nodes = [RedisServer(extra_args=(*args, "--cluster-port", str(bus))) for bus in self.bus_ports]
        self.n_masters = masters

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes[:self.n_masters])

    def start(self) -> "ClusterSet":
        for n in self.nodes:
            n.start()
        clients = [n.client() for n in self.nodes]
        per = _SLOTS // self.n_masters
        for i in range(self.n_masters):
            hi = _SLOTS - 1 if i == self.n_masters - 1 else (i + 1) * per - 1
            clients[i].execute_command("CLUSTER", "ADDSLOTSRANGE", i * per, hi)
        for n, bus in zip(self.nodes[1:], self.bus_ports[1:]):
            clients[0].execute_command("CLUSTER", "MEET", "127.0.0.1", n.port, bus)
        _wait("every node to know every other",
              lambda: all(len(c.execute_command("CLUSTER", "NODES").decode().splitlines()) == len(self.nodes)
                          for c in clients))
        ids = [c.execute_command("CLUSTER", "MYID").decode() for c in clients]
        for j, c in enumerate(clients[self.n_masters:]):
            master_id = ids[j % self.n_masters]
            _wait("the replica to see its master",
                  lambda: master_id in c.execute_command("CLUSTER", "NODES").decode())
            c.execute_command("CLUSTER", "REPLICATE", master_id)
        _wait("cluster_state:ok on every node",
              lambda: all(b"cluster_state:ok" in c.execute_command("CLUSTER", "INFO") for c in clients))
        _wait("replicas in sync", lambda: all(
            c.info("replication").get("master_link_status") == "up" for c in clients[self.n_masters:]))
        for c in clients:
            c.close()
        return self

    def client(self, node: RedisServer) -> redis.Redis:
        return node.client(socket_timeout=5)

    def master_of_slot(self, slot: int) -> RedisServer:
        """The master serving `slot`, as the first live node answering says."""
        for n in self.live_nodes():
            with n.client(socket_connect_timeout=0.5) as c:
                for lo, hi, master, *_ in c.execute_command("CLUSTER", "SLOTS"):
                    if lo <= slot <= hi:
                        port = int(master[1])
                        return next(x for x in self.nodes if x.port == port)
        raise RuntimeError(f"no node serves slot {slot}")

    def live_nodes(self) -> list[RedisServer]:
        return [n for n in self.nodes if n.proc is not None and n.proc.poll() is None]

    def masters(self) -> list[RedisServer]:
        out = []
        for n in self.live_nodes():
            with n.client() as c:
                if c.info("replication").get("role") == "master":
                    out.append(n)
        return out

    def migrate_slot(self, slot: int, target: RedisServer, *, keys_per_round: int = 100) -> int:
        """Move `slot` and its keys to `target`, as a resharding does; returns the keys moved."""
        source = self.master_of_slot(slot)
        if source is target:
            return 0
        with source.client() as src, target.client() as dst:
            src_id = src.execute_command("CLUSTER", "MYID").decode()
            dst_id = dst.execute_command("CLUSTER", "MYID").decode()
            dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
            src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
            moved = 0
            while True:
                keys = src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, keys_per_round)
                if not keys:
                    break
                src.execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *keys)
                moved += len(keys)
            for n in self.masters():
                with n.client() as c:
                    c.execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
        return moved

    def kill(self, node: RedisServer) -> None:
        """SIGKILL (no shutdown, no last save): what a crashed machine looks like."""
        assert node.proc is not None
        node.proc.kill()
        node.proc.wait()
        node.proc = None

    def wait_healthy(self, timeout: float = 20.0) -> None:
        def ok() -> bool:
            for n in self.live_nodes():
                with n.client(socket_connect_timeout=0.5) as c:
                    if b"cluster_state:ok" not in c.execute_command("CLUSTER", "INFO"):
                        return False
            return True
        _wait("cluster_state:ok", ok, timeout)

    def cleanup(self) -> None:
        for n in self.nodes:
            n.cleanup()


class _Sentinel:
    def __init__(self, master_port: int, name: str) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="xp-sentinel-"))
        conf = self.dir / "sentinel.conf"
        conf.write_text(f"port {self.port}\nbind 127.0.0.1\ndir {self.dir}\n"
                        f"sentinel monitor {name} 127.0.0.1 {master_port} 2\n"
                        f"sentinel down-after-milliseconds {name} 1000\n"
                        f"sentinel failover-timeout {name} 4000\n")
        self.proc = subprocess.Popen([server_binary().path, str(conf), "--sentinel"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=2)

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


class SentinelSet:
    """A master, its replica and three sentinels watching them as `name`."""

    def __init__(self, name: str = "xpmaster") -> None:
        self.name = name
        self.master = RedisServer()
        self.replica: RedisServer | None = None
        self.sentinels: list[_Sentinel] = []

    @property
    def url(self) -> str:
        return "redis+sentinel://" + ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels) + f"/{self.name}"

    def start(self) -> "SentinelSet":
        self.master.start()
        self.replica = RedisServer(extra_args=("--replicaof", "127.0.0.1", str(self.master.port))).start()
        replica = self.replica
        _wait("the replica in sync", lambda: replica.client().info("replication").get("master_link_status") == "up")
        self.sentinels = [_Sentinel(self.master.port, self.name) for _ in range(3)]

        def sentinels_ready() -> bool:
            for s in self.sentinels:
                with s.client() as c:
                    fields = c.sentinel_master(self.name)
                    if int(fields["num-other-sentinels"]) < 2 or int(fields["num-slaves"]) < 1:
                        return False
            return True
        _wait("three sentinels that know each other and the replica", sentinels_ready)
        return self

    def master_port(self) -> int:
        with self.sentinels[0].client() as c:
            return int(c.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.name)[1])

    def current_master(self) -> RedisServer:
        port = self.master_port()
        assert self.replica is not None
        return self.master if self.master.port == port else self.replica

    def failover(self) -> None:
        """SENTINEL FAILOVER: the replica becomes the master (no agreement needed, no data lost
        beyond what the replica had not received)."""
        before = self.master_port()
        with self.sentinels[0].client() as c:
            c.execute_command("SENTINEL", "FAILOVER", self.name)
        _wait("the sentinels to name a new master", lambda: self.master_port() != before)

    def cleanup(self) -> None:
        for s in self.sentinels:
            s.cleanup()
        for n in (self.master, self.replica):
            if n is not None:
                n.cleanup()
