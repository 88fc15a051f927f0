"""Tenancy on a shared Redis Cluster (3 masters + 3 replicas) and a Sentinel set (1 master, 1 replica,
3 sentinels), real servers on loopback (tests/redis_cluster.py): the organism's users exist on every
node, rotate everywhere, come back on a node that lost them (named in the condition), and go with the
Organism, whose keys are removed from every master; a tenant logged in through a cluster client is
refused another tenant's keys on every master."""
from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis_cluster import LocalCluster, LocalSentinel, start_cluster, start_sentinel

from xml_pipeline_operator.redis_admin import Tenant
from xml_pipeline_operator.settings import OperatorSettings
from xml_pipeline_operator.tenancy import acl, client_acl, ownership
from xml_pipeline_operator.tenancy.admin import PROGRESS_KEY, CleanupInProgress, SharedRedisAdmin

pytestmark = pytest.mark.cluster

ADMIN_PASSWORD = "admin-" + secrets.token_hex(8)


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    """One cluster for the module (tests use distinct organisms); the admin is `default`."""
    c = start_cluster(password=ADMIN_PASSWORD)
    yield c
    c.close()


@pytest.fixture(scope="module")
def sentinel_set() -> Iterator[LocalSentinel]:
    s = start_sentinel(password=ADMIN_PASSWORD)
    yield s
    s.close()


def admin_for(url: str, **kw: float) -> SharedRedisAdmin:
    return SharedRedisAdmin(OperatorSettings(shared_redis_url=url, shared_redis_password=ADMIN_PASSWORD), **kw)


def tenant(name: str) -> Tenant:
    return Tenant("team", name, f"xp:team.{name}:", username=acl.username_for("team", name), uid="uid-" + name)


def node_clients(cluster: LocalCluster) -> dict[str, redis.Redis]:
    return {n.address: n.client() for n in cluster.live_nodes()}


def can_login(host: str, port: int, username: str, password: str) -> bool:
    c = redis.Redis(host=host, port=port, username=username, password=password, socket_timeout=3,
                    retry=Retry(NoBackoff(), 0))  # a refusal is the answer, not a reason to retry
    try:
        return bool(c.ping())
    except (redis.AuthenticationError, redis.ResponseError):
        return False
    finally:
        c.close()


def keys_on_every_master(cluster: LocalCluster, prefix: str, count: int = 60) -> list[str]:
    """`count` keys under `prefix` whose slots cover every master (checked)."""
    keys = [f"{prefix}buffer:{{t-{i}}}" for i in range(count)]
    owners = {cluster.owner_of(cluster.key_slot(k)).address for k in keys}
    assert owners == {m.address for m in cluster.masters()}
    return keys


# -- the users on every node --------------------------------------------------------------------------
def test_users_are_created_on_every_cluster_node(cluster: LocalCluster) -> None:
    admin = admin_for(cluster.url)
    t = tenant("orders")
    state = admin.ensure_tenant(t, "pw-orders")
    assert state.ready and state.reason == "AclUserReady", state
    assert "on each of its 6 nodes" in state.message and not state.repaired
    client = admin.ensure_client(t, client_acl.client_username("team", "orders"), "pw-client")
    assert client.ready, client
    for address, c in node_clients(cluster).items():  # masters and replicas alike
        user = acl.get_user(c, t.username)
        assert user is not None and user.enabled and user.key_patterns == {"~xp:team.orders:*"}, address
        assert user.password_hashes == {acl.password_hash("pw-orders")}, address
        assert acl.user_exists(c, "xpc-team.orders"), address
        host, port = address.rsplit(":", 1)
        assert can_login(host, int(port), t.username, "pw-orders"), address
    # Idle: a second pass writes no ACL anywhere.
    before = {a: c.info("commandstats").get("cmdstat_acl|setuser", {}).get("calls", 0)
              for a, c in node_clients(cluster).items()}
    assert admin.ensure_tenant(t, "pw-orders").ready
    after = {a: c.info("commandstats").get("cmdstat_acl|setuser", {}).get("calls", 0)
             for a, c in node_clients(cluster).items()}
    assert after == before


def test_rotation_changes_the_user_on_every_node(cluster: LocalCluster) -> None:
    admin = admin_for(cluster.url)
    t = tenant("rotor")
    assert admin.ensure_tenant(t, "old-pw").ready
    # Accepting: the new password beside the old one, everywhere; then retire the old one.
    assert admin.ensure_tenant(t, "new-pw", frozenset({acl.password_hash("old-pw")})).ready
    for address in node_clients(cluster):
        host, port = address.rsplit(":", 1)
        assert can_login(host, int(port), t.username, "old-pw") and can_login(host, int(port), t.username, "new-pw")
    assert admin.ensure_tenant(t, "new-pw").ready
    for address in node_clients(cluster):
        host, port = address.rsplit(":", 1)
        assert not can_login(host, int(port), t.username, "old-pw"), address
        assert can_login(host, int(port), t.username, "new-pw"), address


def test_a_hand_edited_password_is_reported_from_any_node(cluster: LocalCluster) -> None:
    admin = admin_for(cluster.url)
    t = tenant("edited")
    assert admin.ensure_tenant(t, "first").ready
    state = admin.ensure_tenant(t, "second")
    assert not state.ready and state.reason == "PasswordChanged"
    assert state.still_accepted == {acl.password_hash("first")}


def test_a_node_that_lost_the_user_is_repaired_and_named(cluster: LocalCluster) -> None:
    admin = admin_for(cluster.url)
    t = tenant("phoenix")
    assert admin.ensure_tenant(t, "pw").ready
    replica = cluster.replicas()[0]
    assert acl.delete_user(replica.client(), t.username)  # ACL DELUSER on one node only
    state = admin.ensure_tenant(t, "pw")
    assert state.ready and state.repaired == (replica.address,)
    assert f"re-created on node(s) {replica.address}, which had lost it" in state.message
    assert acl.user_exists(replica.client(), t.username)
    # A node restarted without an ACL file: the same, at the next call.
    cluster.kill(replica)
    cluster.restart(replica)
    assert not acl.user_exists(replica.client(), t.username)
    state = admin.ensure_tenant(t, "pw")
    assert state.ready and state.repaired == (replica.address,), state
    assert can_login(replica.host, replica.port, t.username, "pw")


def test_the_periodic_check_repairs_every_node(cluster: LocalCluster) -> None:
    admin = admin_for(cluster.url, user_check_interval=0.0, usage_interval=3600.0)
    t = tenant("checked")
    assert admin.ensure_tenant(t, "pw").ready
    admin.periodic()  # learns every node's run_id
    master = cluster.masters()[1]
    acl.delete_user(master.client(), t.username)
    admin.periodic()
    assert acl.user_exists(master.client(), t.username)


def test_release_removes_keys_from_every_master_and_users_from_every_node(cluster: LocalCluster) -> None:
    admin = admin_for(cluster.url, cleanup_budget=0.0)
    t, neighbour = tenant("gone"), tenant("gone-b")  # gone-b's prefix starts differently: never touched
    for x in (t, neighbour):
        assert admin.ensure_tenant(x, "pw").ready
    assert admin.ensure_client(t, "xpc-team.gone", "cpw").ready
    data = cluster.client()
    mine = keys_on_every_master(cluster, t.prefix, 300)
    theirs = keys_on_every_master(cluster, neighbour.prefix)
    for k in mine + theirs:
        data.set(k, "v")
    admin.cleanup_batch = 50
    calls = 0
    while True:  # a tiny budget: the finalizer is called again and again, resuming per master
        calls += 1
        try:
            admin.release_tenant(t, "Delete")
            break
        except CleanupInProgress:
            assert calls < 50
    assert calls > 1
    for m in cluster.masters():
        assert list(m.client().scan_iter(match=f"{t.prefix}*")) == [], m.address
    assert all(data.get(k) == b"v" for k in theirs)
    for address, c in node_clients(cluster).items():
        assert not acl.user_exists(c, t.username) and not acl.user_exists(c, "xpc-team.gone"), address
        assert acl.user_exists(c, neighbour.username), address
    primary = admin.client()
    assert ownership.owner_of(primary, t.prefix) is None
    assert ownership.owner_of(primary, neighbour.prefix) is not None
    assert primary.get(PROGRESS_KEY + t.prefix) is None


def test_usage_is_summed_over_every_master(cluster: LocalCluster) -> None:
    admin = admin_for(cluster.url, usage_interval=0.0, user_check_interval=3600.0)
    t = tenant("counted")
    assert admin.ensure_tenant(t, "pw").ready
    data = cluster.client()
    keys = keys_on_every_master(cluster, t.prefix, 40)
    for k in keys:
        data.rpush(k, "slot")
    for _ in range(3):  # one tick per master and call; a small keyspace completes a round per tick
        admin.periodic()
    usage = admin.usage_of("team", "counted")
    assert usage is not None and usage.threads == 40 and usage.keys == 40, usage


def test_a_refused_admin_or_an_unreachable_cluster_is_a_condition(cluster: LocalCluster) -> None:
    wrong = SharedRedisAdmin(OperatorSettings(shared_redis_url=cluster.url, shared_redis_password="not-the-pw"))
    state = wrong.ensure_tenant(tenant("refused"), "pw")
    assert not state.ready and state.reason == "SharedRedisAuthFailed", state
    assert "not-the-pw" not in state.message and cluster.url in state.message
    nowhere = admin_for("redis+cluster://127.0.0.1:1,127.0.0.1:2")
    state = nowhere.ensure_tenant(tenant("refused"), "pw")
    assert not state.ready and state.reason == "SharedRedisUnavailable", state
    assert "127.0.0.1:1" in state.message and "127.0.0.1:2" in state.message


# -- isolation through a cluster client ------------------------------------------------------------------
def test_a_tenant_cluster_client_is_refused_the_other_tenants_keys_on_every_master(cluster: LocalCluster) -> None:
    admin = admin_for(cluster.url)
    a, b = tenant("iso-a"), tenant("iso-b")
    assert admin.ensure_tenant(a, "pw-a").ready and admin.ensure_tenant(b, "pw-b").ready
    seed = cluster.masters()[0]
    as_a = redis.RedisCluster(host=seed.host, port=seed.port, username=a.username, password="pw-a")
    try:
        own = keys_on_every_master(cluster, a.prefix, 30)
        for k in own:  # its own keys work on every master
            as_a.set(k, "mine")
            assert as_a.get(k) == b"mine"
        others = keys_on_every_master(cluster, b.prefix, 30)
        refused = set()
        for k in others:
            for call in (lambda k=k: as_a.get(k), lambda k=k: as_a.set(k, "x"), lambda k=k: as_a.delete(k)):
                with pytest.raises(redis.exceptions.NoPermissionError):
                    call()
            refused.add(cluster.owner_of(cluster.key_slot(k)).address)
        assert refused == {m.address for m in cluster.masters()}
        for m in cluster.masters():  # no listing of other tenants' key names on any node
            with pytest.raises(redis.exceptions.NoPermissionError):
                as_a.execute_command("SCAN", 0, target_nodes=as_a.get_node(m.host, m.port))
            with pytest.raises(redis.exceptions.NoPermissionError):
                as_a.execute_command("FLUSHALL", target_nodes=as_a.get_node(m.host, m.port))
    finally:
        as_a.close()


# -- Sentinel ------------------------------------------------------------------------------------------
def test_sentinel_users_on_master_and_replica_and_repair(sentinel_set: LocalSentinel) -> None:
    admin = admin_for(sentinel_set.url)
    t = tenant("watched")
    state = admin.ensure_tenant(t, "pw")
    assert state.ready and "on each of its 2 nodes" in state.message, state
    for node in sentinel_set.data_nodes():
        assert can_login("127.0.0.1", node.port, t.username, "pw"), node.port
    replica = sentinel_set.replicas[0]
    acl.delete_user(replica.client(), t.username)
    state = admin.ensure_tenant(t, "pw")
    assert state.repaired == (f"127.0.0.1:{replica.port}",)
    # Keys live on the master; release removes them there and the user everywhere.
    master = sentinel_set.current_master().client()
    master.set(f"{t.prefix}buffer:{{t-1}}", "x")
    admin.release_tenant(t, "Delete")
    assert list(master.scan_iter(match=f"{t.prefix}*")) == []
    for node in sentinel_set.data_nodes():
        assert not acl.user_exists(node.client(), t.username)


def test_after_a_sentinel_failover_the_users_are_already_on_the_new_master(sentinel_set: LocalSentinel) -> None:
    admin = admin_for(sentinel_set.url)
    t = tenant("survivor")
    assert admin.ensure_tenant(t, "pw").ready
    new = sentinel_set.failover(kill=False)
    assert can_login("127.0.0.1", new.port, t.username, "pw")  # it was made there as a replica
    admin.nodeset.forget()
    state = admin.ensure_tenant(t, "pw")
    assert state.ready and not state.repaired
    assert admin.client().connection_pool.connection_kwargs["port"] == new.port  # records follow the master
