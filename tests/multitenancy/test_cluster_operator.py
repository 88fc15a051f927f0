"""The kopf operator (on kmock) with a real local Redis Cluster and Sentinel set: shared mode on a
cluster (users on every node, a node that lost them repaired at the next reconcile and named in the
condition and an event, deletion cleaning every master), and external mode cluster / sentinel (the
pods' XP_REDIS_URL, the probe through the seeds and the sentinels)."""
from __future__ import annotations

import base64
import dataclasses
import importlib.util
import secrets
import sys
from pathlib import Path
from typing import Any

import pytest
import redis
from redis_cluster import LocalCluster, LocalSentinel

from xml_pipeline_operator.tenancy import acl
from xml_pipeline_operator.tenancy.admin import SharedRedisAdmin

pytestmark = pytest.mark.cluster

_OPERATOR_TESTS = Path(__file__).resolve().parents[1] / "operator"
if str(_OPERATOR_TESTS) not in sys.path:
    sys.path.append(str(_OPERATOR_TESTS))
_spec = importlib.util.spec_from_file_location("xp_operator_harness_cluster", _OPERATOR_TESTS / "conftest.py")
assert _spec is not None and _spec.loader is not None
harness = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = harness
_spec.loader.exec_module(harness)
k8s = harness.k8s
kubeconfig = harness.kubeconfig
start_operator = harness.start_operator
eventually, get_obj, condition = harness.eventually, harness.get_obj, harness.condition
ORGANISMS, DEPLOYMENTS = harness.ORGANISMS, harness.DEPLOYMENTS

ADMIN_PASSWORD = "admin-" + secrets.token_hex(8)
LISTENERS = [{"name": "greeter", "handler": "xml_pipeline.examples.greeter:handle"}]
MERGE = {"Content-Type": "application/merge-patch+json"}



async def create(k8s: Any, name: str, spec: dict[str, Any]) -> None:
    resp = await k8s.post(harness.org_path(), json=harness.organism(name, spec, "default"))
    assert resp.status == 201, await resp.text()


def redis_ready(k8s: Any, name: str) -> dict[str, Any] | None:
    obj = get_obj(k8s, ORGANISMS, name)
    c = condition(obj, "RedisReady")
    return obj if c and c["status"] == "True" else None


def pod_env(k8s: Any, name: str) -> dict[str, Any]:
    pump = get_obj(k8s, DEPLOYMENTS, f"{name}-pump")
    assert pump is not None
    return {e["name"]: e for e in pump["spec"]["template"]["spec"]["containers"][0]["env"]}


def event_messages(k8s: Any, reason: str) -> list[str]:
    found = [get_obj(k8s, "v1/events", n) for n in harness.live_names(k8s, "v1/events")]
    return [str(e.get("message", "")) for e in found if e and e.get("reason") == reason]


async def test_shared_mode_on_a_cluster_every_node_repaired_and_cleaned(k8s: Any, start_operator: Any,
                                                                        cluster: LocalCluster) -> None:
    settings = dataclasses.replace(harness.TEST_SETTINGS, shared_redis_url=cluster.url,
                                   shared_redis_password=ADMIN_PASSWORD)
    await start_operator(settings, admin=SharedRedisAdmin(settings, usage_interval=3600.0,
                                                          user_check_interval=3600.0))
    await create(k8s, "bus", {"config": {"listeners": LISTENERS},
                              "backend": {"redis": {"mode": "shared", "ttl": 600}}})
    org = await eventually(lambda: redis_ready(k8s, "bus"))
    assert "on each of its 6 nodes" in condition(org, "RedisReady")["message"]
    assert org["status"]["redis"]["topology"] == "cluster"
    env = pod_env(k8s, "bus")
    assert env["XP_REDIS_URL"]["value"] == cluster.url  # no credentials in it
    secret = get_obj(k8s, "v1/secrets", "bus-credentials")
    password = base64.b64decode(secret["data"]["redis-password"]).decode()
    for node in cluster.live_nodes():
        assert acl.user_exists(node.client(), "xp-default.bus"), node.address
    binding = get_obj(k8s, "v1/secrets", "bus-binding")
    assert binding is not None and base64.b64decode(binding["data"]["mode"]).decode() == "cluster"
    assert base64.b64decode(binding["data"]["url"]).decode() == cluster.url
    # A node loses the user: the next reconcile (here: a spec change) re-creates it and says where.
    lost = cluster.masters()[2]
    acl.delete_user(lost.client(), "xp-default.bus")
    resp = await k8s.patch(harness.org_path("bus"), json={"spec": {"backend": {"redis": {"ttl": 700}}}},
                           headers=MERGE)
    assert resp.status == 200
    await eventually(lambda: acl.user_exists(lost.client(), "xp-default.bus"))
    await eventually(lambda: any(lost.address in m for m in event_messages(k8s, "AclUserRepaired")))
    # The pods' user works through a cluster client, on every master.
    as_bus = redis.RedisCluster(host=lost.host, port=lost.port, username="xp-default.bus", password=password)
    keys = [f"xp:default.bus:buffer:{{t-{i}}}" for i in range(60)]
    for k in keys:
        as_bus.set(k, "x")
    as_bus.close()
    # Deletion: every key on every master, the users on every node.
    resp = await k8s.delete(harness.org_path("bus"))
    assert resp.status == 200
    await eventually(lambda: get_obj(k8s, ORGANISMS, "bus") is None)
    for m in cluster.masters():
        assert list(m.client().scan_iter(match="xp:default.bus:*")) == [], m.address
    for node in cluster.live_nodes():
        assert not acl.user_exists(node.client(), "xp-default.bus"), node.address
        assert not acl.user_exists(node.client(), "xpc-default.bus"), node.address


async def test_external_cluster_and_sentinel_reach_the_pods_and_are_probed(
        k8s: Any, start_operator: Any, cluster: LocalCluster, sentinel_set: LocalSentinel) -> None:
    await start_operator()
    resp = await k8s.post("/api/v1/namespaces/default/secrets", json={
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "ext-auth"},
        "data": {"password": base64.b64encode(ADMIN_PASSWORD.encode()).decode(),
                 "wrong": base64.b64encode(b"not-it").decode()}})
    assert resp.status == 201
    seeds = cluster.seeds[:2]
    await create(k8s, "on-cluster", {"config": {"listeners": LISTENERS}, "backend": {"redis": {
        "mode": "external", "external": {"mode": "cluster", "addresses": seeds,
                                         "passwordSecretRef": {"name": "ext-auth"}}}}})
    await create(k8s, "on-sentinel", {"config": {"listeners": LISTENERS}, "backend": {"redis": {
        "mode": "external", "external": {"mode": "sentinel", "addresses": sentinel_set.sentinel_addresses,
                                         "masterName": sentinel_set.master_name,
                                         "passwordSecretRef": {"name": "ext-auth"}}}}})
    await create(k8s, "wrong-pw", {"config": {"listeners": LISTENERS}, "backend": {"redis": {
        "mode": "external", "external": {"mode": "cluster", "addresses": seeds,
                                         "passwordSecretRef": {"name": "ext-auth", "key": "wrong"}}}}})
    org = await eventually(lambda: redis_ready(k8s, "on-cluster"))
    assert condition(org, "RedisReady")["reason"] == "ExternalRedisReachable"
    assert org["status"]["redis"]["topology"] == "cluster"
    assert pod_env(k8s, "on-cluster")["XP_REDIS_URL"]["value"] == "redis+cluster://" + ",".join(seeds)
    org = await eventually(lambda: redis_ready(k8s, "on-sentinel"))
    assert org["status"]["redis"]["topology"] == "sentinel"
    assert pod_env(k8s, "on-sentinel")["XP_REDIS_URL"]["value"] == sentinel_set.url
    bad = await eventually(lambda: (o := get_obj(k8s, ORGANISMS, "wrong-pw"))
                           and (condition(o, "RedisReady") or {}).get("reason") == "ExternalRedisAuthFailed" and o)
    assert "not-it" not in condition(bad, "RedisReady")["message"]
