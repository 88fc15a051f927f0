"""Tenancy on a shared Redis Cluster (3 masters + 3 replicas) and a Sentinel set (1 master, 1 replica,
3 sentinels), real servers on loopback (tests/redis_cluster.py): the organism's users exist on every
node, rotate everywhere, come back on a node that lost them (named in the condition), and go with the
Organism, whose keys are removed from every master; a tenant logged in through a cluster client is
refused another tenant's keys on every master."""
from __future__ import annotations

import secrets

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis_cluster import LocalCluster, LocalSentinel

from xml_pipeline_operator.redis_admin import Tenant
from xml_pipeline_operator.settings import OperatorSettings
from xml_pipeline_operator.tenancy import acl, client_acl, ownership
from xml_pipeline_operator.tenancy.admin import PROGRESS_KEY, CleanupInProgress, SharedRedisAdmin

pytestmark = pytest.mark.cluster

ADMIN_PASSWORD = "admin-" + secrets.token_hex(8)



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
    # A tenant that opts into WAIT (backend.redis_wait_replicas) is granted it here too.
    from xml_pipeline.memory import BackendConfig, ContextBuffer
    from xml_pipeline.memory.redis_backend import RedisBackend
    waiting = RedisBackend(BackendConfig(backend_type="redis", redis_url=sentinel_set.url, redis_prefix=t.prefix,
                                         redis_ttl=600, redis_username=t.username, redis_password="pw",
                                         signing_key=secrets.token_hex(16), redis_wait_replicas=1))
    try:
        assert ContextBuffer(waiting).append("t-w", "<x/>", "a", "b").metadata.slot_index == 0
    finally:
        waiting.close()
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


# -- the client identity on a cluster ---------------------------------------------------------------------
def test_a_client_user_on_the_cluster_sends_reads_and_is_refused_the_rest(cluster: LocalCluster) -> None:
    """The client user the operator makes on every node (contract.client_commands / client_key_patterns
    in cluster mode): the client API sends into ingress, gets its answer from egress, reads threads and
    the registry through a cluster client; writes to the buffer, reads of ingress, scripts and another
    organism's keys are NOPERM on every master."""
    import threading
    import time

    from xml_pipeline import contract
    from xml_pipeline.client import OrganismClient
    from xml_pipeline.errors import BackendError
    from xml_pipeline.memory import BackendConfig, ContextBuffer
    from xml_pipeline.memory.redis_backend import RedisBackend
    from xml_pipeline.message_bus.message import Message

    admin = admin_for(cluster.url)
    t, other = tenant("cli-org"), tenant("cli-other")
    cuser = client_acl.client_username("team", "cli-org")
    assert admin.ensure_tenant(t, "pw-org").ready and admin.ensure_tenant(other, "pw-other").ready
    assert admin.ensure_client(t, cuser, "pw-cli").ready
    for c in node_clients(cluster).values():  # the cluster's grant on every node, masters and replicas
        user = acl.get_user(c, cuser)
        assert user is not None and {f"%R~{t.prefix}meta:index:*", f"%W~{t.prefix}ingress:{{{t.prefix}}}"} \
            <= user.key_patterns, user
    setusers = {a: c.info("commandstats").get("cmdstat_acl|setuser", {}).get("calls", 0)
                for a, c in node_clients(cluster).items()}
    assert admin.ensure_client(t, cuser, "pw-cli").ready  # converged: a second pass writes nothing
    assert setusers == {a: c.info("commandstats").get("cmdstat_acl|setuser", {}).get("calls", 0)
                        for a, c in node_clients(cluster).items()}
    key = secrets.token_hex(16)

    def config(prefix: str, username: str, password: str) -> BackendConfig:
        return BackendConfig(backend_type="redis", redis_url=cluster.url, redis_prefix=prefix, redis_ttl=600,
                             redis_username=username, redis_password=password, signing_key=key)

    org = RedisBackend(config(t.prefix, t.username, "pw-org"))
    threads = [f"th-{i}" for i in range(24)]  # threads and index buckets on every master
    assert {cluster.owner_of(cluster.key_slot(org.keys.buffer(th))).address for th in threads} \
        == {m.address for m in cluster.masters()}
    buffer = ContextBuffer(org)
    for th in threads:
        buffer.append(th, {"n": th}, "web", "greeter")
    org.registry_set("web.greeter", threads[0])
    client = OrganismClient(config(t.prefix, cuser, "pw-cli"))
    try:
        assert [s.payload for s in client.read_thread(threads[5])] == [{"n": threads[5]}]
        assert client.threads() == sorted(threads)
        assert client.thread_of("web.greeter") == threads[0] and client.chain_of(threads[0]) == "web.greeter"
        # A reverse entry its chain key does not confirm (a re-mapping stopped half way): no chain, and
        # the read-only client leaves the repair to the organism's own user.
        org.client.set(org.keys.uuid("th-stale"), "web.gone")
        assert client.chain_of("th-stale") is None and org.client.exists(org.keys.uuid("th-stale"))
        assert org.registry_get_chain("th-stale") is None and not org.client.exists(org.keys.uuid("th-stale"))
        # Send and wait: the organism (its own user) answers the message it finds on ingress.
        message = Message(sender="web", to="greeter", payload="<hello/>")
        got: dict[str, Message] = {}
        asking = threading.Thread(target=lambda: got.setdefault("answer", client.request(message, timeout=20)))
        asking.start()
        ingress, egress = org.key("ingress"), org.key("egress")
        deadline = time.monotonic() + 20
        while not any(f.get(b"id") == message.id.encode() for _, f in org.client.xrange(ingress)):
            assert time.monotonic() < deadline, "the client's message never reached ingress"
            time.sleep(0.05)
        answer = Message(sender="greeter", to="web", payload="<hi/>", in_reply_to=message.id)
        org.client.xadd(egress, {"xml": answer.to_xml(), "in_reply_to": message.id})
        asking.join(25)
        assert got["answer"].payload == "<hi/>"
        # Refused: writes to the buffer, reads of ingress, scripts, through the client API and raw.
        with pytest.raises(BackendError, match="(?i)no permissions"):  # Redis: "no permissions", Valkey: "No permissions"
            ContextBuffer(client.backend).append(threads[1], {"n": "forged"}, "web", "greeter")
        seed = cluster.masters()[0]
        raw = redis.RedisCluster(host=seed.host, port=seed.port, username=cuser, password="pw-cli")
        try:
            for th in threads:
                with pytest.raises(redis.exceptions.NoPermissionError):
                    raw.rpush(org.keys.buffer(th), b"forged")
            with pytest.raises(redis.exceptions.NoPermissionError):
                raw.xrange(ingress)
            with pytest.raises(redis.exceptions.NoPermissionError):
                raw.execute_command("FCALL_RO", "xp_buffer_len", 1, org.keys.buffer(threads[0]))
            refused = set()
            for k in keys_on_every_master(cluster, other.prefix, 30):
                with pytest.raises(redis.exceptions.NoPermissionError):
                    raw.get(k)
                refused.add(cluster.owner_of(cluster.key_slot(k)).address)
            assert refused == {m.address for m in cluster.masters()}
        finally:
            raw.close()
        # The client API pointed at another organism's prefix: refused.
        stray = OrganismClient(config(other.prefix, cuser, "pw-cli"))
        try:
            with pytest.raises(BackendError, match="(?i)no permissions"):  # Redis: "no permissions", Valkey: "No permissions"
                stray.read_thread(threads[0])
        finally:
            stray.close()
        assert set(contract.CLUSTER_TOPOLOGY_COMMANDS) <= set(contract.client_commands("cluster"))
    finally:
        client.close()
        org.buffer_clear()
        org.registry_clear()
        org.close()
