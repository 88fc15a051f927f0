"""The local Redis Cluster and Sentinel sets the cluster tests run on (tests/redis_cluster.py) behave
as the real thing: slots served, keys spread over the masters, resharding moves keys with ASK/MOVED,
a killed master is replaced by its replica, a sentinel failover promotes the replica."""
from __future__ import annotations

import pytest
import redis

from redis_cluster import LocalCluster, LocalSentinel, cluster_supported

pytestmark = [pytest.mark.cluster,
              pytest.mark.skipif(bool(cluster_supported()), reason=cluster_supported() or "supported")]


def test_cluster_serves_every_slot_and_spreads_keys(redis_cluster: LocalCluster) -> None:
    assert len(redis_cluster.masters()) == 3
    assert len(redis_cluster.replicas()) == 3
    client = redis_cluster.client()
    for i in range(60):
        client.set(f"k{i}", i)
    owners = {redis_cluster.owner_of(redis_cluster.key_slot(f"k{i}")).port for i in range(60)}
    assert len(owners) == 3  # 60 keys never all land on one of three equal slot ranges
    assert int(client.get("k7")) == 7


def test_migrate_slot_moves_keys_and_clients_follow(redis_cluster: LocalCluster) -> None:
    client = redis_cluster.client()
    keys = [f"{{tag}}:{i}" for i in range(25)]
    for k in keys:
        client.set(k, k)
    slot = redis_cluster.key_slot(keys[0])
    source = redis_cluster.owner_of(slot)
    target = next(m for m in redis_cluster.masters() if m is not source)
    assert redis_cluster.migrate_slot(slot, target) == 25
    assert redis_cluster.owner_of(slot) is target
    # The old owner answers MOVED now; redis-py's cluster client follows it.
    with pytest.raises(redis.exceptions.MovedError):
        source.client().get(keys[0])
    assert [v.decode() for v in client.mget(keys)] == keys


def test_killed_master_is_replaced_by_its_replica(redis_cluster: LocalCluster) -> None:
    client = redis_cluster.client()
    client.set("survivor", "yes")
    master = redis_cluster.owner_of(redis_cluster.key_slot("survivor"))
    assert master.client().wait(1, 2000) == 1  # replicated before the kill
    promoted = redis_cluster.kill_master_and_wait_failover(master)
    assert promoted.role() == "master"
    assert redis_cluster.owner_of(redis_cluster.key_slot("survivor")) is promoted
    assert promoted.client().get("survivor") == b"yes"


def test_sentinel_failover_promotes_the_replica(redis_sentinel: LocalSentinel) -> None:
    old = redis_sentinel.current_master()
    old.client().set("k", "v")
    old.client().wait(1, 2000)
    new = redis_sentinel.failover()
    assert new is not old
    assert new.client().get("k") == b"v"
    assert redis_sentinel.url.startswith("redis+sentinel://127.0.0.1:")
    assert redis_sentinel.url.endswith("/xp-master")
