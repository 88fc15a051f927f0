"""ClusterClient (memory/redis_cluster_client.py): routing a command never depends on one node staying up.

redis-py finds the keys of XREADGROUP / XREAD / FCALL by asking the cluster's default node
(COMMAND GETKEYS) before its retry loop; a dead default node was never replaced, and a worker
(whose commands are all of that kind) asked the dead address for ever. The key positions are
checked here against the server's own answer, and the routing across a dead default node on a
real cluster.
"""
from __future__ import annotations

import time
from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis_cluster import LocalCluster

from xml_pipeline.memory import BackendConfig
from xml_pipeline.memory.redis_cluster import RedisClusterBackend
from xml_pipeline.memory.redis_cluster_client import ClusterClient, command_keys

pytestmark = pytest.mark.cluster

SIGNING_KEY = "cluster-client-tests-signing-key-0123456789"

def _backend(cluster: LocalCluster) -> RedisClusterBackend:
    return RedisClusterBackend(BackendConfig(backend_type="redis", redis_url=cluster.url,
                                             redis_prefix=f"xcc{time.monotonic_ns()}:", signing_key=SIGNING_KEY,
                                             socket_timeout=1.0, connect_timeout=0.5))


PARSED = [
    ("XREADGROUP", "GROUP", "g", "c", "COUNT", 1, "BLOCK", 50, "STREAMS", "s:{a}", ">"),
    (b"XREADGROUP", b"GROUP", b"g", b"c", b"NOACK", b"STREAMS", b"s1:{a}", b"s2:{a}", b">", b">"),
    ("xreadgroup", "group", "g", "STREAMS", "STREAMS", "s:{a}", ">"),  # a consumer named STREAMS
    ("XREAD", "COUNT", 2, "STREAMS", "a:{x}", "b:{x}", "0", "0"),
    ("XREAD", "STREAMS", "k", "$"),
    ("FCALL", "f", 2, "k1:{t}", "k2:{t}", "arg"),
    ("FCALL_RO", "f", 0, "arg"),
]


@pytest.mark.parametrize("args", PARSED)
def test_the_keys_found_client_side_are_the_servers(args: tuple[Any, ...], shared_cluster: LocalCluster) -> None:
    keys = command_keys(args)
    assert keys is not None
    if not keys:  # a function called without keys: the server has no keys to name either
        assert args[2] == 0
        return
    server = shared_cluster.live_nodes()[0].client()
    def text(k: Any) -> str:
        return k.decode() if isinstance(k, bytes) else str(k)

    assert [text(k) for k in server.execute_command("COMMAND GETKEYS", *args)] == [text(k) for k in keys]


@pytest.mark.parametrize("args", [
    ("GET", "k"),                                         # fixed positions: redis-py's own table
    ("XREADGROUP", "GROUP", "g"),                         # truncated: the server says what is wrong
    ("XREAD", "COUNT", 1, "STREAMS", "a", "b", "c"),      # odd number after STREAMS
    ("XREAD", "BOGUS", 1, "STREAMS", "a", "0"),
    ("FCALL", "f", "two", "k"),
    ("FCALL", "f", 3, "k"),
])
def test_other_or_malformed_commands_are_left_to_redis_py(args: tuple[Any, ...]) -> None:
    assert command_keys(args) is None


def test_a_dead_default_node_does_not_pin_the_client(redis_cluster: LocalCluster) -> None:
    """The state a slot-map refresh during a failover leaves behind: the default node is the dead
    master. Commands with movable keys are still routed to their slot's live master."""
    backend = _backend(redis_cluster)
    client = backend.client
    assert isinstance(client, ClusterClient)
    stream = backend.key("tasks")
    client.xgroup_create(stream, "g", id="0", mkstream=True)
    client.xadd(stream, {"f": "v"})
    victim = next(m for m in redis_cluster.masters() if m is not redis_cluster.owner_of(client.keyslot(stream)))
    redis_cluster.kill_master_and_wait_failover(victim)
    dead = client.get_node(host=victim.host, port=victim.port)
    assert dead is not None
    client.nodes_manager.default_node = dead

    # Keys found client-side: no question to the dead node at all.
    got = client.xreadgroup("g", "c", {stream: ">"}, count=1, block=50)
    assert got and got[0][1][0][1] == {b"f": b"v"}
    assert client.get_default_node() is dead
    # Keys redis-py asks a node for (ZUNION: movable keys): the lookup moves off the dead node.
    client.zadd(stream + ":z", {"m": 1})
    assert client.execute_command("ZUNION", 1, stream + ":z") == [b"m"]
    assert client.get_default_node().name != dead.name
    backend.close()


def test_a_cluster_with_no_node_answering_is_a_connection_error(redis_cluster: LocalCluster) -> None:
    """An outage that loops such as a worker's wait out (ConnectionError), not redis-py's
    RedisClusterException from the slot-map refresh, which would stop them."""
    backend = _backend(redis_cluster)
    client = backend.client
    stream = backend.key("tasks")
    client.xgroup_create(stream, "g", id="0", mkstream=True)
    for node in redis_cluster.live_nodes():
        redis_cluster.kill(node)
    with pytest.raises(RedisConnectionError):
        client.xreadgroup("g", "c", {stream: ">"}, count=1, block=50)
    with pytest.raises(RedisConnectionError):
        backend.send_commands([("XADD", stream, "*", "f", "v")])
    backend.close()
