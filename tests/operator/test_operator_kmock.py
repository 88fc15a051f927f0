"""The real kopf operator, in-process, against kmock: lifecycle, roll-outs, status, idempotency."""
from __future__ import annotations

import asyncio
import base64
import dataclasses
from pathlib import Path
from typing import Any

import pytest
import yaml

from operator_harness import (DEPLOYMENTS, ORGANISMS, TEST_SETTINGS, condition, eventually, get_obj, live_names,
                      org_path, organism, quiet, writes)
from kmock_cluster import Cluster
from xml_pipeline_operator.desired.naming import CONFIG_HASH_ANNOTATION
from xml_pipeline_operator.model import reason_for
from xml_pipeline_operator.redis_admin import Tenant, TenantState

LISTENERS = [{"name": "greeter", "handler": "xml_pipeline.examples.greeter:handle"},
             {"name": "primes", "handler": "xml_pipeline.examples.cpu:count_primes", "cpu_bound": True}]
SPEC = {"config": {"listeners": LISTENERS}, "backend": {"redis": {"ttl": 600}}, "workers": {"replicas": 2}}
MERGE = {"Content-Type": "application/merge-patch+json"}
BAD_SPECS = Path(__file__).parent / "bad_specs"


async def create(k8s: Cluster, name: str, spec: dict[str, Any], namespace: str = "default") -> None:
    resp = await k8s.post(org_path(namespace=namespace), json=organism(name, spec, namespace))
    assert resp.status == 201, await resp.text()


async def patch_spec(k8s: Cluster, name: str, spec: dict[str, Any]) -> None:
    resp = await k8s.patch(org_path(name), json={"spec": spec}, headers=MERGE)
    assert resp.status == 200, await resp.text()


async def mark_ready(k8s: Cluster, name: str, ready: int | None = None, kind: str = "deployments") -> None:
    """Play the Deployment controller: report all replicas ready for the current generation."""
    obj = get_obj(k8s, f"apps/v1/{kind}", name)
    assert obj is not None, name
    n = obj["spec"]["replicas"] if ready is None else ready
    status = {"observedGeneration": obj["metadata"]["generation"], "replicas": obj["spec"]["replicas"],
              "readyReplicas": n, "updatedReplicas": n, "availableReplicas": n}
    resp = await k8s.patch(f"/apis/apps/v1/namespaces/default/{kind}/{name}/status", json={"status": status},
                           headers=MERGE)
    assert resp.status == 200


def ready(k8s: Cluster, name: str, status: str = "True") -> dict[str, Any] | None:
    obj = get_obj(k8s, ORGANISMS, name)
    c = condition(obj, "Ready")
    return obj if c and c["status"] == status else None


def pod_hash(k8s: Cluster, name: str) -> str:
    obj = get_obj(k8s, DEPLOYMENTS, name)
    assert obj is not None
    return str(obj["spec"]["template"]["metadata"]["annotations"][CONFIG_HASH_ANNOTATION])


def secret_values(k8s: Cluster, name: str) -> dict[str, str]:
    obj = get_obj(k8s, "v1/secrets", name)
    assert obj is not None
    return {k: base64.b64decode(v).decode() for k, v in obj["data"].items()}


def events(k8s: Cluster) -> list[dict[str, Any]]:
    return [e for n in live_names(k8s, "v1/events") if (e := get_obj(k8s, "v1/events", n))]


def event_reasons(k8s: Cluster) -> list[str]:
    return [str(e.get("reason")) for e in events(k8s)]


def successful_creates(k8s: Cluster, plural: str) -> list[str]:
    return [r.data["metadata"]["name"] for r in k8s.history
            if r.method.value == "POST" and r.url.path.endswith(f"/{plural}") and k8s.status_of(r) == 201]


# ----------------------------------------------------------------------------------------------- tests
async def test_create_gives_objects_status_and_events(k8s: Cluster, start_operator: Any) -> None:
    await start_operator()
    await create(k8s, "orders", SPEC)
    await eventually(lambda: get_obj(k8s, DEPLOYMENTS, "orders-worker"))
    org = await eventually(lambda: (o := get_obj(k8s, ORGANISMS, "orders")) and o.get("status", {}).get("redis") and o)

    assert live_names(k8s, DEPLOYMENTS) == ["orders-pump", "orders-redis", "orders-worker"]
    assert live_names(k8s, "v1/services") == ["orders-redis"]
    assert live_names(k8s, "networking.k8s.io/v1/networkpolicies") == ["orders-redis"]
    assert live_names(k8s, "v1/configmaps") == ["orders-config"]
    assert live_names(k8s, "v1/secrets") == ["orders-binding", "orders-credentials"]
    uid = org["metadata"]["uid"]
    for res, name in [(DEPLOYMENTS, "orders-pump"), ("v1/secrets", "orders-credentials"), ("v1/configmaps", "orders-config")]:
        assert get_obj(k8s, res, name)["metadata"]["ownerReferences"][0]["uid"] == uid
    assert set(secret_values(k8s, "orders-credentials")) == {"redis-username", "redis-password", "signing-key"}
    assert "xml-pipeline.dev/finalizer" in org["metadata"]["finalizers"]

    status = org["status"]
    assert status["redis"] == {"mode": "dedicated", "endpoint": "redis://orders-redis.default.svc:6379/0",
                               "prefix": "xp:default.orders:", "ttl": 600, "secretName": "orders-credentials",
                               "topology": "standalone"}
    assert status["phase"] == "Provisioning" and status["workersReady"] == "0/2"
    assert status["observedGeneration"] == org["metadata"]["generation"]
    assert [c["type"] for c in status["conditions"]] == ["RedisReady", "PumpReady", "WorkersReady", "Ready"]
    assert condition(org, "Ready")["status"] == "False"
    created = await eventually(lambda: [e for e in events(k8s) if e["reason"] == "Created"])
    assert len(created) == 1  # one event per pass, naming every object
    assert created[0]["message"] == ("Created Secret orders-credentials, Secret orders-binding, ConfigMap orders-config, "
                                     "NetworkPolicy orders-redis, Service orders-redis, "
                                     "Deployment orders-redis, Deployment orders-pump, Deployment orders-worker, "
                                     "PodDisruptionBudget orders-worker")
    assert created[0]["involvedObject"]["uid"] == uid


async def test_deployment_status_from_the_test_makes_the_organism_ready(k8s: Cluster, start_operator: Any) -> None:
    await start_operator()
    await create(k8s, "orders", SPEC)
    await eventually(lambda: get_obj(k8s, DEPLOYMENTS, "orders-worker"))
    await mark_ready(k8s, "orders-redis")
    await eventually(lambda: (condition(get_obj(k8s, ORGANISMS, "orders"), "RedisReady") or {}).get("status") == "True")
    await mark_ready(k8s, "orders-pump")
    await mark_ready(k8s, "orders-worker", ready=1)
    org = await eventually(lambda: (o := get_obj(k8s, ORGANISMS, "orders"))
                           and o["status"].get("workersReady") == "1/2" and o)
    assert condition(org, "WorkersReady")["status"] == "False" and condition(org, "Ready")["status"] == "False"
    await mark_ready(k8s, "orders-worker")
    org = await eventually(lambda: ready(k8s, "orders"))
    assert org["status"]["phase"] == "Ready" and org["status"]["workersReady"] == "2/2"
    await eventually(lambda: "Ready" in event_reasons(k8s))
    # A worker pod dies: Degraded, and Ready tells why.
    await mark_ready(k8s, "orders-worker", ready=1)
    org = await eventually(lambda: ready(k8s, "orders", "False"))
    assert org["status"]["phase"] == "Degraded" and condition(org, "Ready")["reason"] == "WorkersStarting"


@pytest.mark.parametrize("change", [
    {"config": {"listeners": LISTENERS[:1]}},
    {"backend": {"redis": {"ttl": 1200}}},
    {"image": "ghcr.io/xml-pipeline/xml-pipeline:next"},
    {"workers": {"processes": 3}},
], ids=["config", "ttl", "image", "worker-processes"])
async def test_update_rolls_the_pods(k8s: Cluster, start_operator: Any, change: dict[str, Any]) -> None:
    await start_operator()
    await create(k8s, "orders", SPEC)
    await eventually(lambda: get_obj(k8s, DEPLOYMENTS, "orders-worker"))
    before = pod_hash(k8s, "orders-pump"), pod_hash(k8s, "orders-worker")
    credentials = secret_values(k8s, "orders-credentials")
    await patch_spec(k8s, "orders", change)
    await eventually(lambda: pod_hash(k8s, "orders-pump") != before[0] and pod_hash(k8s, "orders-worker") != before[1])
    after = pod_hash(k8s, "orders-pump"), pod_hash(k8s, "orders-worker")
    assert after[0] == after[1] and after[0] != before[0]
    org = await eventually(lambda: (o := get_obj(k8s, ORGANISMS, "orders")) and o["status"]["configHash"] == after[0] and o)
    assert org["status"]["observedGeneration"] == org["metadata"]["generation"] == 2
    assert secret_values(k8s, "orders-credentials") == credentials  # never rotated by an update
    updated = await eventually(lambda: [e for e in events(k8s) if e["reason"] == "Updated"])
    assert "Deployment orders-pump" in updated[0]["message"] and updated[0]["message"].endswith("rolling the pods")


async def test_scaling_workers_changes_replicas_without_a_rollout(k8s: Cluster, start_operator: Any) -> None:
    await start_operator()
    await create(k8s, "orders", SPEC)
    await eventually(lambda: get_obj(k8s, DEPLOYMENTS, "orders-worker"))
    before = pod_hash(k8s, "orders-worker")
    await patch_spec(k8s, "orders", {"workers": {"replicas": 5}})
    await eventually(lambda: get_obj(k8s, DEPLOYMENTS, "orders-worker")["spec"]["replicas"] == 5)
    assert pod_hash(k8s, "orders-worker") == before


async def test_delete_runs_the_finalizer(k8s: Cluster, start_operator: Any) -> None:
    released: list[Tenant] = []

    class RecordingAdmin:
        def ensure_tenant(self, tenant: Tenant, password: str, also_accept_hashes: Any = frozenset()) -> TenantState:
            assert len(password) == 64 and not also_accept_hashes
            return TenantState(True, "SharedRedisAclReady", f"user {tenant.username}")

        def release_tenant(self, tenant: Tenant) -> None:
            released.append(tenant)

        def ensure_client(self, tenant: Tenant, username: str, password: str,
                          also_accept_hashes: Any = frozenset()) -> TenantState:
            return TenantState(True, "ClientUserReady", f"user {username}")

    await start_operator(admin=RecordingAdmin())
    await create(k8s, "bus", {"config": {"listeners": LISTENERS}, "backend": {"redis": {"mode": "shared"}}})
    org = await eventually(lambda: (o := get_obj(k8s, ORGANISMS, "bus")) and condition(o, "RedisReady") and o)
    assert condition(org, "RedisReady")["reason"] == "SharedRedisAclReady"
    assert secret_values(k8s, "bus-credentials")["redis-username"] == "xp-default.bus"
    resp = await k8s.delete(org_path("bus"))
    assert resp.status == 200
    await eventually(lambda: get_obj(k8s, ORGANISMS, "bus") is None)  # finalizer removed, object gone
    assert released == [Tenant("default", "bus", "xp:default.bus:", username="xp-default.bus")]
    await eventually(lambda: "Deleted" in event_reasons(k8s))


async def test_restart_mid_provisioning_converges_without_duplicates(k8s: Cluster, start_operator: Any) -> None:
    # The first operator can create the Secret, ConfigMap and Service, but no Deployment.
    def no_deployments(request: Any) -> int | None:
        return 503 if request.method.value == "POST" and request.url.path.endswith("/deployments") else None
    k8s.faults.append(no_deployments)
    first = await start_operator()
    await create(k8s, "orders", SPEC)
    await eventually(lambda: any(r.method.value == "POST" and r.url.path.endswith("/deployments") for r in k8s.history))
    await first.stop()
    assert live_names(k8s, DEPLOYMENTS) == []
    credentials = secret_values(k8s, "orders-credentials")

    k8s.faults.remove(no_deployments)
    await start_operator()
    await eventually(lambda: get_obj(k8s, DEPLOYMENTS, "orders-worker"))
    await quiet(k8s)
    assert live_names(k8s, DEPLOYMENTS) == ["orders-pump", "orders-redis", "orders-worker"]
    assert sorted(successful_creates(k8s, "secrets")) == ["orders-binding", "orders-credentials"]
    assert successful_creates(k8s, "configmaps") == ["orders-config"]
    assert successful_creates(k8s, "services") == ["orders-redis"]
    assert sorted(successful_creates(k8s, "deployments")) == ["orders-pump", "orders-redis", "orders-worker"]
    assert secret_values(k8s, "orders-credentials") == credentials  # the same Secret, not regenerated
    assert [e for e in k8s.errors if getattr(e, "status", None) == 409] == []


async def test_idle_resync_makes_zero_writes(k8s: Cluster, start_operator: Any) -> None:
    first = await start_operator()
    await create(k8s, "orders", SPEC)
    await create(k8s, "local", {"config": {"listeners": LISTENERS}, "backend": {"type": "manager"}})
    await eventually(lambda: get_obj(k8s, DEPLOYMENTS, "orders-worker") and get_obj(k8s, DEPLOYMENTS, "local-pump"))
    for name in ("orders-redis", "orders-pump", "orders-worker", "local-pump"):
        await mark_ready(k8s, name)
    await eventually(lambda: ready(k8s, "orders") and ready(k8s, "local"))
    await quiet(k8s)
    await first.stop()

    # A restarted operator resumes every Organism, and with a short resync period reconciles them
    # again on timers: all of it reads, none of it writes.
    start = len(k8s.history)
    op = await start_operator(dataclasses.replace(TEST_SETTINGS, resync_seconds=0.3))
    await eventually(lambda: op.reconciler.kube.requests[("get", "Organism")] >= 6)  # resume + 2 resyncs each
    await op.stop()
    assert writes(k8s, start) == []
    assert op.reconciler.kube.writes == 0


@pytest.fixture
def external_redis() -> Any:
    """A real redis-server with a password, standing in for a Redis the platform runs elsewhere."""
    from redis_server import RedisServer

    server = RedisServer(password="pw").start()
    yield server
    server.cleanup()


async def test_missing_external_secret_is_reported_and_retried(k8s: Cluster, start_operator: Any,
                                                                external_redis: Any) -> None:
    await start_operator()
    spec = {"config": {"listeners": LISTENERS}, "backend": {"redis": {"mode": "external", "external": {
        "url": external_redis.url, "passwordSecretRef": {"name": "ext-auth"}}}}}
    await create(k8s, "ext", spec)
    org = await eventually(lambda: ready(k8s, "ext", "False"))
    assert condition(org, "RedisReady")["reason"] == "ExternalSecretMissing"
    assert condition(org, "Ready")["reason"] == "ExternalSecretMissing" and "'ext-auth'" in condition(org, "Ready")["message"]
    assert get_obj(k8s, DEPLOYMENTS, "ext-pump") is None  # pods would not start without their Secret
    await eventually(lambda: "ExternalSecretMissing" in event_reasons(k8s))
    # kopf's own warning about the retried handler is an event too (posting.loggers, level WARNING)
    await eventually(lambda: any(e["type"] in ("Warning", "Error") and "failed temporarily" in e["message"] for e in events(k8s)))
    gets_before = sum(1 for r in k8s.history if r.url.path.endswith("/secrets/ext-auth"))
    await eventually(lambda: sum(1 for r in k8s.history if r.url.path.endswith("/secrets/ext-auth")) >= gets_before + 2)

    resp = await k8s.post("/api/v1/namespaces/default/secrets", json={
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "ext-auth"},
        "data": {"password": base64.b64encode(b"pw").decode()}})
    assert resp.status == 201
    pump = await eventually(lambda: get_obj(k8s, DEPLOYMENTS, "ext-pump"))
    env = {e["name"]: e for e in pump["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["XP_REDIS_PASSWORD"]["valueFrom"] == {"secretKeyRef": {"name": "ext-auth", "key": "password"}}
    org = await eventually(lambda: (o := get_obj(k8s, ORGANISMS, "ext"))
                           and condition(o, "RedisReady")["status"] == "True" and o)
    assert condition(org, "RedisReady")["reason"] == "ExternalRedisReachable"  # probed with the Secret's password
    assert live_names(k8s, "v1/services") == []  # nothing provisioned for external Redis


async def test_external_redis_probe_reports_wrong_password_and_unreachable(k8s: Cluster, start_operator: Any,
                                                                          external_redis: Any) -> None:
    from redis_server import free_port

    await start_operator()
    resp = await k8s.post("/api/v1/namespaces/default/secrets", json={
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "ext-wrong"},
        "data": {"password": base64.b64encode(b"not-the-password").decode()}})
    assert resp.status == 201
    for name, url in (("wrongpw", external_redis.url), ("nowhere", f"redis://127.0.0.1:{free_port()}/0")):
        await create(k8s, name, {"config": {"listeners": LISTENERS}, "backend": {"redis": {
            "mode": "external", "external": {"url": url, "passwordSecretRef": {"name": "ext-wrong"}}}}})
    probed = lambda n: (o := get_obj(k8s, ORGANISMS, n)) and "ExternalRedis" in (condition(o, "RedisReady") or {}).get("reason", "") and o  # noqa: E731
    org = await eventually(lambda: probed("wrongpw"))
    cond = condition(org, "RedisReady")
    assert (cond["status"], cond["reason"]) == ("False", "ExternalRedisAuthFailed")
    assert "'ext-wrong'" in cond["message"] and "not-the-password" not in cond["message"]
    org = await eventually(lambda: probed("nowhere"))
    cond = condition(org, "RedisReady")
    assert (cond["status"], cond["reason"]) == ("False", "ExternalRedisUnreachable")
    assert "XPO_PROBE_EXTERNAL_REDIS=false" in cond["message"]
    # Not blocking: the pods are rolled out (they may reach what the operator cannot).
    assert get_obj(k8s, DEPLOYMENTS, "wrongpw-pump") and get_obj(k8s, DEPLOYMENTS, "nowhere-pump")


async def test_external_redis_probe_can_be_switched_off(k8s: Cluster, start_operator: Any) -> None:
    await start_operator(dataclasses.replace(TEST_SETTINGS, probe_external_redis=False))
    resp = await k8s.post("/api/v1/namespaces/default/secrets", json={
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "ext-auth"},
        "data": {"password": base64.b64encode(b"pw").decode()}})
    assert resp.status == 201
    await create(k8s, "ext", {"config": {"listeners": LISTENERS}, "backend": {"redis": {"mode": "external", "external": {
        "url": "rediss://redis.example:6380/0", "passwordSecretRef": {"name": "ext-auth"}}}}})
    org = await eventually(lambda: (o := get_obj(k8s, ORGANISMS, "ext"))
                           and (condition(o, "RedisReady") or {}).get("status") == "True" and o)
    assert condition(org, "RedisReady")["reason"] == "ExternalRedisConfigured"


async def test_bad_specs_get_ready_false_naming_the_field(k8s: Cluster, start_operator: Any) -> None:
    specs = {}
    for path in sorted(BAD_SPECS.glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        field = next(line.split(": ", 1)[1] for line in path.read_text().splitlines() if line.startswith("# model: "))
        specs[doc["metadata"]["name"]] = (doc, field)
    assert len(specs) >= 10
    await start_operator()
    for name, (doc, _) in specs.items():
        resp = await k8s.post(org_path(), json=doc)  # kmock validates nothing: like a CRD without schema
        assert resp.status == 201
    for name, (_, field) in specs.items():
        org = await eventually(lambda name=name: ready(k8s, name, "False"))
        cond = condition(org, "Ready")
        assert cond["reason"] == reason_for(field) and cond["message"].startswith(field), (name, cond)
        assert org["status"]["phase"] == "Failed"
    await quiet(k8s)
    assert live_names(k8s, DEPLOYMENTS) == [] and live_names(k8s, "v1/configmaps") == []
    assert "InvalidBackendRedisTtl" in event_reasons(k8s)


async def test_prefix_change_is_refused_and_nothing_moves(k8s: Cluster, start_operator: Any) -> None:
    await start_operator()
    await create(k8s, "orders", SPEC)
    await eventually(lambda: get_obj(k8s, DEPLOYMENTS, "orders-worker"))
    before = get_obj(k8s, DEPLOYMENTS, "orders-pump")
    await patch_spec(k8s, "orders", {"backend": {"redis": {"prefix": "xp:other:"}}})
    org = await eventually(lambda: (o := ready(k8s, "orders", "False")) and condition(o, "Ready")["reason"] == "PrefixImmutable" and o)
    assert "'xp:default.orders:'" in condition(org, "Ready")["message"]
    assert org["status"]["redis"]["prefix"] == "xp:default.orders:" and org["status"]["phase"] == "Failed"
    await quiet(k8s)
    assert get_obj(k8s, DEPLOYMENTS, "orders-pump")["spec"] == before["spec"]
    # Reverting the prefix recovers.
    await patch_spec(k8s, "orders", {"backend": {"redis": {"prefix": None}}})
    await eventually(lambda: condition(get_obj(k8s, ORGANISMS, "orders"), "Ready")["reason"] != "PrefixImmutable")


async def test_switching_to_memory_removes_redis_and_workers(k8s: Cluster, start_operator: Any) -> None:
    await start_operator()
    await create(k8s, "orders", SPEC)
    await eventually(lambda: get_obj(k8s, DEPLOYMENTS, "orders-worker"))
    await patch_spec(k8s, "orders", {"backend": {"type": "memory", "redis": None}, "workers": None})
    await eventually(lambda: live_names(k8s, DEPLOYMENTS) == ["orders-pump"])
    assert live_names(k8s, "v1/services") == []
    assert live_names(k8s, "networking.k8s.io/v1/networkpolicies") == []
    org = await eventually(lambda: (o := get_obj(k8s, ORGANISMS, "orders")) and "redis" not in o["status"] and o)
    assert condition(org, "RedisReady")["reason"] == "NotRequired"
    assert live_names(k8s, "v1/secrets") == ["orders-binding", "orders-credentials"]  # kept: a switch back reuses them


async def test_foreign_objects_are_never_taken_over(k8s: Cluster, start_operator: Any) -> None:
    foreign = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "orders-config"}, "data": {"mine": "yes"}}
    assert (await k8s.post("/api/v1/namespaces/default/configmaps", json=foreign)).status == 201
    await start_operator()
    await create(k8s, "orders", SPEC)
    org = await eventually(lambda: ready(k8s, "orders", "False"))
    assert condition(org, "Ready")["reason"] == "NameConflict"
    assert "ConfigMap 'orders-config'" in condition(org, "Ready")["message"]
    assert get_obj(k8s, "v1/configmaps", "orders-config")["data"] == {"mine": "yes"}
    assert get_obj(k8s, DEPLOYMENTS, "orders-pump") is None


async def test_a_deleted_deployment_is_recreated(k8s: Cluster, start_operator: Any) -> None:
    await start_operator()
    await create(k8s, "orders", SPEC)
    first = await eventually(lambda: get_obj(k8s, DEPLOYMENTS, "orders-pump"))
    await eventually(lambda: get_obj(k8s, DEPLOYMENTS, "orders-worker"))
    resp = await k8s.delete("/apis/apps/v1/namespaces/default/deployments/orders-pump")
    assert resp.status == 200
    second = await eventually(lambda: (d := get_obj(k8s, DEPLOYMENTS, "orders-pump"))
                              and d["metadata"]["uid"] != first["metadata"]["uid"] and d)
    assert second["spec"] == first["spec"]


async def test_namespaced_operator_ignores_other_namespaces(k8s: Cluster, start_operator: Any) -> None:
    await start_operator(dataclasses.replace(TEST_SETTINGS, namespaces=("team-a",)))
    await create(k8s, "bus", {"config": {"listeners": LISTENERS}}, namespace="team-b")
    await create(k8s, "bus", {"config": {"listeners": LISTENERS}}, namespace="team-a")
    await eventually(lambda: get_obj(k8s, DEPLOYMENTS, "bus-pump", namespace="team-a"))
    await quiet(k8s)
    assert get_obj(k8s, DEPLOYMENTS, "bus-pump", namespace="team-b") is None
    assert not (get_obj(k8s, ORGANISMS, "bus", namespace="team-b") or {}).get("status")


async def test_concurrent_handlers_for_one_organism_do_not_race(k8s: Cluster, start_operator: Any) -> None:
    """Many Deployment status events at once: one Ready event, consistent status."""
    await start_operator()
    await create(k8s, "orders", SPEC)
    await eventually(lambda: get_obj(k8s, DEPLOYMENTS, "orders-worker"))
    await quiet(k8s, settle=0.2)
    await asyncio.gather(*(mark_ready(k8s, n) for n in ("orders-redis", "orders-pump", "orders-worker")))
    await eventually(lambda: ready(k8s, "orders"))
    await quiet(k8s)
    assert event_reasons(k8s).count("Ready") == 1
