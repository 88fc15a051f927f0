"""kopf on kmock: shaped pods, autoscaler-owned worker replicas (KEDA or HPA), disruption budgets,
hand edits of managed objects, and an idle resync that writes nothing with autoscaling on."""
from __future__ import annotations

import dataclasses
from typing import Any

import kmock

from operator_harness import (DEPLOYMENTS, ORGANISMS, TEST_SETTINGS, condition, eventually, get_obj, quiet, writes)
from kmock_cluster import Cluster
from test_operator_kmock import MERGE, create, mark_ready, patch_spec, ready

LISTENERS = [{"name": "greeter", "handler": "xml_pipeline.examples.greeter:handle"}]
PDBS = "policy/v1/poddisruptionbudgets"
HPAS = "autoscaling/v2/horizontalpodautoscalers"
SCALED = "keda.sh/v1alpha1/scaledobjects"
TRIGGER_AUTH = "keda.sh/v1alpha1/triggerauthentications"
SHAPE = {"metadata": {"labels": {"team": "orders"}, "annotations": {"example.com/owner": "orders"}},
         "spec": {"env": [{"name": "API_TOKEN", "valueFrom": {"secretKeyRef": {"name": "orders-api", "key": "token"}}}],
                  "volumes": [{"name": "certs", "secret": {"secretName": "orders-certs"}}],
                  "volumeMounts": [{"name": "certs", "mountPath": "/var/run/certs", "readOnly": True}],
                  "serviceAccountName": "orders-handlers", "nodeSelector": {"pool": "cpu"},
                  "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "xp", "effect": "NoSchedule"}]}}
AUTOSCALED = {"config": {"listeners": LISTENERS},
              "workers": {"processes": 2, "autoscaling": {"minReplicas": 0, "maxReplicas": 8, "tasksPerReplica": 4},
                          "template": SHAPE}}


def serve_keda(k8s: Cluster) -> None:
    for plural, kind in (("scaledobjects", "ScaledObject"), ("triggerauthentications", "TriggerAuthentication")):
        k8s.resources[f"keda.sh/v1alpha1/{plural}"] = kmock.ResourceInfo(
            kind=kind, singular=kind.lower(), namespaced=True,
            verbs={"create", "delete", "get", "list", "patch", "update", "watch"})


def container(deploy: dict[str, Any]) -> dict[str, Any]:
    (c,) = deploy["spec"]["template"]["spec"]["containers"]
    return c


async def scale_by_hand(k8s: Cluster, name: str, replicas: int) -> None:
    """What an HPA or KEDA does: write the Deployment's replicas."""
    resp = await k8s.patch(f"/apis/apps/v1/namespaces/default/deployments/{name}", json={"spec": {"replicas": replicas}},
                           headers=MERGE)
    assert resp.status == 200


async def test_keda_scaled_object_and_the_autoscaler_owns_the_worker_replicas(k8s: Cluster, start_operator: Any) -> None:
    serve_keda(k8s)
    op = await start_operator(dataclasses.replace(TEST_SETTINGS, resync_seconds=0.3))
    await create(k8s, "orders", AUTOSCALED)
    so = await eventually(lambda: get_obj(k8s, SCALED, "orders-worker"))
    assert get_obj(k8s, HPAS, "orders-worker") is None
    auth = get_obj(k8s, TRIGGER_AUTH, "orders-worker")
    assert auth is not None and {r["parameter"] for r in auth["spec"]["secretTargetRef"]} == {"username", "password"}
    assert so["spec"]["minReplicaCount"] == 0 and so["spec"]["maxReplicaCount"] == 8
    backlog, running = (t["metadata"] for t in so["spec"]["triggers"])
    assert backlog["stream"] == running["stream"] == "xp:default.orders:tasks"
    assert running["consumerGroup"] == "workers" and running["pendingEntriesCount"] == "2"
    assert backlog["streamLength"] == "4" and "consumerGroup" not in backlog

    worker = await eventually(lambda: get_obj(k8s, DEPLOYMENTS, "orders-worker"))
    assert worker["spec"]["replicas"] == 1  # seeds the Deployment; KEDA owns it from here
    # KEDA scales to 5, then to 0: the operator's resyncs leave both alone.
    for replicas in (5, 0):
        await scale_by_hand(k8s, "orders-worker", replicas)
        before = op.reconciler.kube.requests[("get", "Organism")]
        await eventually(lambda: op.reconciler.kube.requests[("get", "Organism")] >= before + 3)
        assert get_obj(k8s, DEPLOYMENTS, "orders-worker")["spec"]["replicas"] == replicas
    org = get_obj(k8s, ORGANISMS, "orders")
    assert condition(org, "Autoscaling")["reason"] == "KedaScaledObject"
    assert org["status"]["workerSelector"] == ("app.kubernetes.io/name=xml-pipeline,app.kubernetes.io/instance=orders,"
                                               "app.kubernetes.io/component=worker")
    # Workers budget: maxUnavailable 1, never a minAvailable; one pump: no pump budget.
    pdb = get_obj(k8s, PDBS, "orders-worker")
    assert pdb["spec"]["maxUnavailable"] == 1 and "minAvailable" not in pdb["spec"]
    assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    assert get_obj(k8s, PDBS, "orders-pump") is None

    # Autoscaling off: the operator takes the replicas back and removes the KEDA objects.
    await patch_spec(k8s, "orders", {"workers": {"autoscaling": None, "replicas": 3}})
    await eventually(lambda: get_obj(k8s, SCALED, "orders-worker") is None
                     and get_obj(k8s, TRIGGER_AUTH, "orders-worker") is None)
    await eventually(lambda: get_obj(k8s, DEPLOYMENTS, "orders-worker")["spec"]["replicas"] == 3)


async def test_without_keda_an_hpa_and_a_condition_about_scale_to_zero(k8s: Cluster, start_operator: Any) -> None:
    await start_operator()
    await create(k8s, "orders", AUTOSCALED)
    hpa = await eventually(lambda: get_obj(k8s, HPAS, "orders-worker"))
    assert hpa["spec"]["minReplicas"] == 1 and hpa["spec"]["maxReplicas"] == 8
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "orders-worker"}
    org = await eventually(lambda: condition(get_obj(k8s, ORGANISMS, "orders"), "Autoscaling")
                           and get_obj(k8s, ORGANISMS, "orders"))
    cond = condition(org, "Autoscaling")
    assert cond["reason"] == "HpaScaleToZeroNeedsKeda" and "needs KEDA" in cond["message"]


async def test_shaped_pods_and_hand_edits_of_managed_fields_are_reverted(k8s: Cluster, start_operator: Any) -> None:
    await start_operator(dataclasses.replace(TEST_SETTINGS, resync_seconds=0.3))
    await create(k8s, "orders", {"config": {"listeners": LISTENERS}, "workers": {"replicas": 2, "template": SHAPE},
                                 "pump": {"replicas": 2, "template": SHAPE}})
    pump = await eventually(lambda: get_obj(k8s, DEPLOYMENTS, "orders-pump"))
    worker = await eventually(lambda: get_obj(k8s, DEPLOYMENTS, "orders-worker"))
    for deploy in (pump, worker):
        pod = deploy["spec"]["template"]
        assert pod["metadata"]["labels"]["team"] == "orders"
        assert pod["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "xml-pipeline-operator"
        names = [e["name"] for e in container(deploy)["env"]]
        assert names[-1] == "API_TOKEN" and names[0] == "XP_ORGANISM"  # the operator's first, the user's after
        assert [m["name"] for m in container(deploy)["volumeMounts"]] == ["config", "tmp", "certs"]
        assert pod["spec"]["serviceAccountName"] == "orders-handlers"
        assert pod["spec"]["automountServiceAccountToken"] is False
        assert container(deploy)["securityContext"]["runAsNonRoot"] is True
    assert pump["spec"]["replicas"] == 2 and pump["spec"]["strategy"]["type"] == "RollingUpdate"
    pdb = await eventually(lambda: get_obj(k8s, PDBS, "orders-pump"))
    assert pdb["spec"]["maxUnavailable"] == 1

    # Hand edits of fields the operator owns: an added variable, an extra toleration, a changed
    # serviceAccountName. All reverted on the next pass.
    tampered = {"spec": {"template": {"spec": {
        "serviceAccountName": "default",
        "tolerations": SHAPE["spec"]["tolerations"] + [{"key": "gpu", "operator": "Exists"}],
        "containers": [{**container(worker), "env": container(worker)["env"] + [{"name": "DEBUG", "value": "1"}]}]}}}}
    resp = await k8s.patch("/apis/apps/v1/namespaces/default/deployments/orders-worker", json=tampered, headers=MERGE)
    assert resp.status == 200

    def reverted() -> bool:
        w = get_obj(k8s, DEPLOYMENTS, "orders-worker")
        spec = w["spec"]["template"]["spec"]
        return (spec["serviceAccountName"] == "orders-handlers" and len(spec["tolerations"]) == 1
                and "DEBUG" not in [e["name"] for e in container(w)["env"]])
    await eventually(reverted)

    # Removing the template removes what it added (None in the desired state = must be absent).
    await patch_spec(k8s, "orders", {"workers": {"template": None}})

    def unshaped() -> bool:
        spec = get_obj(k8s, DEPLOYMENTS, "orders-worker")["spec"]["template"]["spec"]
        return (not spec.get("tolerations") and not spec.get("serviceAccountName") and not spec.get("nodeSelector")
                and [v["name"] for v in spec["volumes"]] == ["config", "tmp"])
    await eventually(unshaped)
    # One pump again: its budget goes, the pump goes back to Recreate.
    await patch_spec(k8s, "orders", {"pump": {"replicas": 1}})
    await eventually(lambda: get_obj(k8s, PDBS, "orders-pump") is None)
    await eventually(lambda: get_obj(k8s, DEPLOYMENTS, "orders-pump")["spec"]["strategy"] == {"type": "Recreate"})


async def test_idle_resync_with_autoscaling_makes_zero_writes(k8s: Cluster, start_operator: Any) -> None:
    serve_keda(k8s)
    first = await start_operator()
    await create(k8s, "orders", AUTOSCALED)
    await eventually(lambda: get_obj(k8s, SCALED, "orders-worker") and get_obj(k8s, DEPLOYMENTS, "orders-worker"))
    for name in ("orders-redis", "orders-pump", "orders-worker"):
        await mark_ready(k8s, name)
    await eventually(lambda: ready(k8s, "orders"))
    await scale_by_hand(k8s, "orders-worker", 4)  # KEDA's doing
    await mark_ready(k8s, "orders-worker")
    await quiet(k8s)
    await first.stop()

    start = len(k8s.history)
    op = await start_operator(dataclasses.replace(TEST_SETTINGS, resync_seconds=0.3))
    await eventually(lambda: op.reconciler.kube.requests[("get", "Organism")] >= 3)
    await op.stop()
    assert writes(k8s, start) == []
    assert get_obj(k8s, DEPLOYMENTS, "orders-worker")["spec"]["replicas"] == 4
