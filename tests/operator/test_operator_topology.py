"""Cluster and Sentinel without servers: the URLs the operator writes and reads, the external spec's
new fields, node discovery replies, and the per-node decisions of the tenancy fan-out."""
from __future__ import annotations

from typing import Any

import pytest

from operator_harness import TEST_SETTINGS, organism
from xml_pipeline.errors import ConfigError
from xml_pipeline_operator import desired, model, topology
from xml_pipeline_operator.desired import binding
from xml_pipeline_operator.settings import OperatorSettings
from xml_pipeline_operator.tenancy import acl, fanout
from xml_pipeline_operator.tenancy.acl import Change
from xml_pipeline_operator.tenancy.cleanup import CleanupProgress
from xml_pipeline_operator.tenancy.nodes import DiscoveryError, Node, parse_cluster_nodes, parse_sentinel

LISTENERS = [{"name": "greeter", "handler": "xml_pipeline.examples.greeter:handle"}]


def external(**fields: Any) -> dict[str, Any]:
    ext = {"passwordSecretRef": {"name": "auth"}, **fields}
    return organism("orders", {"config": {"listeners": LISTENERS},
                               "backend": {"redis": {"mode": "external", "external": ext}}})


# -- URLs ------------------------------------------------------------------------------------------------
def test_cluster_and_sentinel_urls_round_trip() -> None:
    url = topology.format_url("cluster", (("redis-0.redis", 6379), ("::1", 7000)), tls=True)
    assert url == "rediss+cluster://redis-0.redis:6379,[::1]:7000"
    top = topology.parse_url("f", url)
    assert (top.mode, top.tls, top.addresses) == ("cluster", True, (("redis-0.redis", 6379), ("::1", 7000)))
    url = topology.format_url("sentinel", (("s1", 26379), ("s2", 26380)), master_name="mymaster")
    assert url == "redis+sentinel://s1:26379,s2:26380/mymaster"
    top = topology.parse_url("f", url)
    assert (top.mode, top.master_name, top.tls) == ("sentinel", "mymaster", False)
    assert topology.mode_of("redis://h:1/0") == "standalone" and topology.mode_of(url) == "sentinel"


@pytest.mark.parametrize("url, problem", [
    ("redis+cluster://user:pw@h:1", "credentials"),
    ("redis+cluster://h:1/0", "only database 0"),
    ("redis+sentinel://s:26379", "master-name"),
    ("redis+cluster://h", "host:port"),
    ("redis+cluster://h:1,,h:2", "host:port"),
    ("mongodb://h:1", "scheme"),
])
def test_bad_topology_urls_name_the_field(url: str, problem: str) -> None:
    with pytest.raises(ConfigError) as err:
        topology.parse_url("XPO_SHARED_REDIS_URL", url)
    assert err.value.field == "XPO_SHARED_REDIS_URL" and problem in str(err.value)
    assert "pw" not in str(err.value)


def test_shared_redis_url_may_be_a_cluster_or_sentinel() -> None:
    env = {"XPO_SHARED_REDIS_URL": "redis+cluster://r0:6379,r1:6379"}
    assert OperatorSettings.from_env(env).shared_redis_url == env["XPO_SHARED_REDIS_URL"]
    with pytest.raises(ConfigError) as err:
        OperatorSettings.from_env({"XPO_SHARED_REDIS_URL": "redis+sentinel://s:26379/"})
    assert err.value.field == "XPO_SHARED_REDIS_URL"


# -- the external spec -------------------------------------------------------------------------------------
def test_external_cluster_gives_the_pods_a_cluster_url() -> None:
    org = model.parse_organism(external(mode="cluster", addresses=["r0.data:6379", "10.0.0.5:6380"], tls=True),
                               TEST_SETTINGS)
    assert org.redis is not None and org.redis.external is not None
    assert org.redis.external.url == "rediss+cluster://r0.data:6379,10.0.0.5:6380"
    want = desired.build(org, TEST_SETTINGS)
    assert want.endpoint == "rediss+cluster://r0.data:6379,10.0.0.5:6380"
    env = {e["name"]: e for e in next(o for o in want.workloads if o["metadata"]["name"] == "orders-pump")
           ["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["XP_REDIS_URL"] == {"name": "XP_REDIS_URL", "value": want.endpoint}


def test_external_sentinel_gives_the_pods_a_sentinel_url() -> None:
    org = model.parse_organism(external(mode="sentinel", addresses=["s0:26379", "s1:26379"], masterName="main"),
                               TEST_SETTINGS)
    assert org.redis is not None and org.redis.external is not None
    assert org.redis.external.url == "redis+sentinel://s0:26379,s1:26379/main"
    assert org.redis.external.mode == "sentinel" and org.redis.external.master_name == "main"


def test_external_standalone_stays_the_default() -> None:
    org = model.parse_organism(external(url="rediss://r:6380/0"), TEST_SETTINGS)
    assert org.redis is not None and org.redis.external is not None
    assert (org.redis.external.mode, org.redis.external.url, org.redis.external.tls) == (
        "standalone", "rediss://r:6380/0", True)


@pytest.mark.parametrize("fields, field, allowed", [
    ({"mode": "cluster", "addresses": ["a:1", "a:1"]}, "spec.backend.redis.external.addresses[1]", "each address once"),
    ({"mode": "cluster", "addresses": "a:1"}, "spec.backend.redis.external.addresses", "host:port"),
    ({"mode": "cluster", "addresses": ["a:1"], "tls": "yes"}, "spec.backend.redis.external.tls", "true"),
    ({"mode": "sentinel", "addresses": ["a:1"], "masterName": "m/x"}, "spec.backend.redis.external.masterName",
     "letters, digits"),
    ({"url": "redis://a:1", "tls": True}, "spec.backend.redis.external.tls", "mode: cluster or sentinel"),
    ({"mode": "cluster", "addresses": ["2852039166:6379"]}, "spec.backend.redis.external.addresses[0]",
     "dotted-quad"),
])
def test_external_topology_errors_name_the_field_and_the_allowed_values(fields: dict[str, Any], field: str,
                                                                       allowed: str) -> None:
    with pytest.raises(model.SpecError) as err:
        model.parse_organism(external(**fields), TEST_SETTINGS)
    assert err.value.field == field and allowed in str(err.value), str(err.value)
    assert err.value.reason == model.reason_for(field)


def test_the_binding_of_a_cluster_names_its_mode_and_first_node() -> None:
    org = model.parse_organism(organism("bus", {"config": {"listeners": LISTENERS},
                                                "backend": {"redis": {"mode": "shared"}}}),
                               OperatorSettings(shared_redis_url="rediss+cluster://r0:7000,r1:7001"))
    values = binding.binding_values(org, "rediss+cluster://r0:7000,r1:7001", {}, "pw")
    assert (values["mode"], values["host"], values["port"], values["tls"]) == ("cluster", "r0", "7000", "true")
    assert values["url"] == "rediss+cluster://r0:7000,r1:7001"
    plain = binding.binding_values(org, "redis://r:6379/0", {}, "pw")
    assert (plain["mode"], plain["url"], plain["port"]) == ("standalone", "redis://r:6379/0", "6379")


# -- discovery replies ---------------------------------------------------------------------------------------
CLUSTER_NODES = """\
a1 127.0.0.1:7000@17000 myself,master - 0 0 1 connected 0-5460
b2 127.0.0.1:7001@17001 master - 0 1 2 connected 5461-10922 [10923->-c3]
c3 127.0.0.1:7002@17002,host-c master - 0 1 3 connected 10923-16383
d4 127.0.0.1:7003@17003 slave a1 0 1 1 connected
e5 127.0.0.1:7004@17004 slave,fail b2 0 1 2 disconnected
f6 :0@0 master,noaddr - 0 1 0 disconnected
g7 127.0.0.1:7006@17006 handshake - 0 0 0 connected
"""


def test_cluster_nodes_lists_reachable_masters_then_replicas_with_slots() -> None:
    nodes = parse_cluster_nodes(CLUSTER_NODES)
    assert [(n.address, n.role) for n in nodes] == [
        ("127.0.0.1:7000", "master"), ("127.0.0.1:7001", "master"), ("127.0.0.1:7002", "master"),
        ("127.0.0.1:7003", "replica")]
    assert nodes[0].slots == ((0, 5460),) and nodes[1].slots == ((5461, 10922),)
    assert nodes[0].node_id == "a1"


def test_sentinel_replies_give_the_master_and_live_replicas() -> None:
    replicas = [["ip", "10.0.0.2", "port", "6379", "flags", "slave"],
                {"ip": "10.0.0.3", "port": "6379", "flags": "slave,s_down"},
                ["ip", "10.0.0.1", "port", "6379", "flags", "slave"]]  # the promoted one, still listed
    nodes = parse_sentinel([b"10.0.0.1", b"6379"], replicas)
    assert nodes == [Node("10.0.0.1", 6379, "master"), Node("10.0.0.2", 6379, "replica")]
    with pytest.raises(DiscoveryError):
        parse_sentinel(None, [])


# -- per-node decisions ----------------------------------------------------------------------------------------
def test_a_node_that_had_to_create_the_user_is_a_repaired_node() -> None:
    assert fanout.repaired({"a": Change.UNCHANGED, "b": Change.CREATED, "c": Change.UNCHANGED}) == ("b",)
    assert fanout.repaired({"a": Change.CREATED, "b": Change.CREATED}) == ()  # new everywhere: not a repair
    assert fanout.overall({"a": Change.CREATED, "b": Change.CREATED}) is Change.CREATED
    assert fanout.overall({"a": Change.UNCHANGED, "b": Change.UPDATED}) is Change.UPDATED
    assert fanout.overall({"a": Change.UNCHANGED}) is Change.UNCHANGED


def test_hand_edited_password_digests_are_gathered_from_every_node() -> None:
    def user(*passwords: str) -> acl.AclUser:
        return acl.AclUser("u", True, frozenset(acl.password_hash(p) for p in passwords), frozenset(),
                           frozenset(), frozenset(), False)
    users = {"n1": user("new"), "n2": user("old"), "n3": None}
    assert fanout.still_accepted(users, "new", frozenset()) == {acl.password_hash("old")}
    assert fanout.still_accepted({"n1": user("new")}, "new", frozenset()) == frozenset()


def test_cleanup_is_done_when_every_current_master_is_done() -> None:
    done = CleanupProgress(prefix="p:", done=True)
    assert fanout.progress_done({"m1": done, "m2": done}, ["m1", "m2"])
    assert not fanout.progress_done({"m1": done}, ["m1", "m3"])  # a new master starts from 0
    raw = fanout.progress_to_json({"m1": done})
    assert fanout.progress_from_json(raw, "p:") == {"m1": done}
    assert fanout.progress_from_json(raw, "other:") == {}


def test_keda_triggers_follow_the_topology() -> None:
    from xml_pipeline_operator.desired import scaling
    spec = external(mode="sentinel", addresses=["s0:26379", "s1:26379"], masterName="main", tls=True)
    spec["spec"]["workers"] = {"autoscaling": {"maxReplicas": 4}}
    org = model.parse_organism(spec, TEST_SETTINGS)
    obj = scaling.scaled_object(org, org.redis.external.url)  # type: ignore[union-attr]
    trigger = obj["spec"]["triggers"][0]
    assert trigger["type"] == "redis-sentinel-streams"
    assert trigger["metadata"]["addresses"] == "s0:26379,s1:26379"
    assert trigger["metadata"]["sentinelMaster"] == "main" and trigger["metadata"]["enableTLS"] == "true"
    assert scaling.trigger_type("redis+cluster://a:1,b:2") == "redis-cluster-streams"
    assert scaling.trigger_metadata(org, "redis+cluster://a:1,b:2")[0]["addresses"] == "a:1,b:2"
    assert scaling.trigger_type("redis://a:1/0") == "redis-streams"


def test_a_ca_secret_goes_with_tls_in_every_external_mode() -> None:
    ca = {"caSecretRef": {"name": "redis-ca"}}
    org = model.parse_organism(external(mode="cluster", addresses=["r0:6379"], tls=True, **ca), TEST_SETTINGS)
    assert org.redis is not None and org.redis.external is not None
    assert org.redis.external.ca == model.SecretKeyRef("redis-ca", "ca.crt")
    for fields in ({"mode": "cluster", "addresses": ["r0:6379"]}, {"url": "redis://r:6379/0"}):
        with pytest.raises(model.SpecError) as err:
            model.parse_organism(external(**fields, **ca), TEST_SETTINGS)
        assert err.value.field == "spec.backend.redis.external.caSecretRef" and "TLS" in str(err.value)
