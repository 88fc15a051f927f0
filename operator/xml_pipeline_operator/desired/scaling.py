"""Worker autoscaling (KEDA ScaledObject + TriggerAuthentication, or an HPA) and PodDisruptionBudgets.

What KEDA's `redis-streams` scaler reads, and why these triggers:
- The tasks stream (`<prefix>tasks`) holds only unfinished tasks: a worker XACKs and XDELs a task in
  one MULTI with its result. So its length (XLEN, the scaler's mode without consumerGroup) is every
  task queued or running. That trigger wakes the workers from zero (with no consumer nothing is ever
  delivered, so the pending count alone would stay 0) and sizes the pool: ceil(XLEN / tasksPerReplica).
- The `workers` group's pending entries (XPENDING, mode with consumerGroup) are the tasks being run,
  one per busy worker process: ceil(pending / processes) keeps every busy pod while its tasks finish.
  KEDA takes the larger of the two.
The group's lag (XINFO GROUPS) is not used: the scaler reads plain INFO before it, which the tenant
ACL user of a shared Redis may not run (it has `info|server` only).

On a Redis Cluster the tasks stream is CLUSTER_TASKS_BUCKETS bucket streams (the library's
message_bus/streams.py, "Task buckets"), and KEDA takes the largest of its triggers, so a trigger
per bucket would see one bucket's share of the backlog. There the ScaledObject has the two triggers
per bucket (`backlog<n>`, `running<n>`) and a scaling modifier that adds them up: the composite
metric max(sum of XLEN, sum of XPENDING * tasksPerReplica / processes) against the target
tasksPerReplica gives the same replicas as the two triggers on one stream.
"""
from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from xml_pipeline.contract import CLUSTER_TASKS_BUCKETS, redis_mode
from xml_pipeline.memory.keys import ClusterKeys

from ..model import Organism
from ..topology import format_address, parse_url
from .naming import PASSWORD_KEY, USERNAME_KEY, labels, pump_name, secret_name, selector_labels, worker_name

KEDA_API = "keda.sh/v1alpha1"
TASKS_SPACE = "tasks"
WORKER_GROUP = "workers"  # xml_pipeline.message_bus.streams.WORKER_GROUP
HPA_CPU_UTILIZATION = 80


def tasks_stream(org: Organism) -> str:
    """The tasks stream of an organism on one server or Sentinel."""
    assert org.redis is not None
    return f"{org.redis.prefix}{TASKS_SPACE}"


def tasks_streams(org: Organism, endpoint: str) -> tuple[str, ...]:
    """Every stream the organism's tasks wait in: the tasks stream, or on a Redis Cluster its
    buckets (the names the library computes, keys.ClusterKeys.task_buckets)."""
    assert org.redis is not None
    if redis_mode(endpoint) != "cluster":
        return (tasks_stream(org),)
    return tuple(tasks for tasks, _ in ClusterKeys(org.redis.prefix).task_buckets(CLUSTER_TASKS_BUCKETS))


def _meta(org: Organism, name: str, component: str = "worker") -> dict[str, Any]:
    return {"name": name, "namespace": org.namespace, "labels": labels(org.name, component),  # type: ignore[arg-type]
            "ownerReferences": [org.owner_reference]}


def scaler_credentials(org: Organism) -> dict[str, tuple[str, str]]:
    """auth parameter -> (Secret, key): the same Secret keys the worker pods read (workloads.xp_env)."""
    assert org.redis is not None
    out = {"username": (secret_name(org.name), USERNAME_KEY), "password": (secret_name(org.name), PASSWORD_KEY)}
    ext = org.redis.external
    if ext is not None:
        out["password"] = (ext.password.name, ext.password.key)
        if ext.username is not None:
            out["username"] = (ext.username.name, ext.username.key)
        else:
            del out["username"]  # the pods authenticate as `default` too
    return out


def trigger_authentication(org: Organism) -> dict[str, Any]:
    refs = [{"parameter": p, "name": s, "key": k} for p, (s, k) in sorted(scaler_credentials(org).items())]
    return {"apiVersion": KEDA_API, "kind": "TriggerAuthentication", "metadata": _meta(org, worker_name(org.name)),
            "spec": {"secretTargetRef": refs}}


def trigger_metadata(org: Organism, endpoint: str) -> list[dict[str, str]]:
    """The redis-streams triggers' metadata (strings, as KEDA wants them): backlog and running of
    each tasks stream (one, or one per bucket on a cluster), in that order."""
    assert org.workers is not None and org.workers.autoscaling is not None
    top = parse_url("endpoint", endpoint)
    common: dict[str, str]
    if top.mode == "standalone":
        url = urlsplit(endpoint)
        common = {"address": f"{url.hostname}:{url.port or 6379}", "databaseIndex": (url.path.strip("/") or "0")}
    else:  # KEDA's redis-cluster-streams / redis-sentinel-streams scalers (trigger_type) take the node list
        common = {"addresses": ",".join(format_address(a) for a in top.addresses)}
        if top.master_name:
            common["sentinelMaster"] = top.master_name
    common["enableTLS"] = "true" if top.tls else "false"
    out = []
    for stream in tasks_streams(org, endpoint):
        out.append({**common, "stream": stream, "streamLength": str(org.workers.autoscaling.tasks_per_replica)})
        out.append({**common, "stream": stream, "consumerGroup": WORKER_GROUP,
                    "pendingEntriesCount": str(org.workers.processes)})
    return out


def trigger_names(count: int) -> list[str]:
    """The triggers' names, in trigger_metadata's order: `tasks-backlog`, `tasks-running` for one
    stream; `backlog<n>`, `running<n>` per bucket (names the scaling modifier's formula uses)."""
    if count == 1:
        return ["tasks-backlog", "tasks-running"]
    return [name for n in range(count) for name in (f"backlog{n}", f"running{n}")]


def scaling_modifiers(org: Organism, count: int) -> dict[str, str]:
    """KEDA's composite metric over `count` bucket streams (module docstring)."""
    assert org.workers is not None and org.workers.autoscaling is not None
    tpr = org.workers.autoscaling.tasks_per_replica
    backlog = " + ".join(f"backlog{n}" for n in range(count))
    running = " + ".join(f"running{n}" for n in range(count))
    return {"formula": f"max({backlog}, ({running}) * {tpr} / {org.workers.processes})",
            "target": str(tpr), "activationTarget": "0", "metricType": "AverageValue"}


def trigger_type(endpoint: str) -> str:
    """KEDA's scaler for the endpoint's topology: one server, a Redis Cluster or a Sentinel set."""
    return {"standalone": "redis-streams", "cluster": "redis-cluster-streams",
            "sentinel": "redis-sentinel-streams"}[redis_mode(endpoint)]


def scaled_object(org: Organism, endpoint: str) -> dict[str, Any]:
    assert org.workers is not None and org.workers.autoscaling is not None
    a = org.workers.autoscaling
    auth = {"name": worker_name(org.name)}
    count = len(tasks_streams(org, endpoint))
    spec: dict[str, Any] = {
        "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": worker_name(org.name)},
        "minReplicaCount": a.min_replicas, "maxReplicaCount": a.max_replicas,
        "cooldownPeriod": a.cooldown_seconds, "pollingInterval": a.polling_seconds,
        "triggers": [{"type": trigger_type(endpoint), "name": n, "metadata": m, "authenticationRef": auth}
                     for n, m in zip(trigger_names(count), trigger_metadata(org, endpoint))],
    }
    if count > 1:
        spec["advanced"] = {"scalingModifiers": scaling_modifiers(org, count)}
    return {"apiVersion": KEDA_API, "kind": "ScaledObject", "metadata": _meta(org, worker_name(org.name)),
            "spec": spec}


def hpa(org: Organism) -> dict[str, Any]:
    """Without KEDA: CPU-based, and never below one replica (HPA cannot scale from zero)."""
    assert org.workers is not None and org.workers.autoscaling is not None
    a = org.workers.autoscaling
    return {
        "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": _meta(org, worker_name(org.name)),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": worker_name(org.name)},
            "minReplicas": max(1, a.min_replicas), "maxReplicas": a.max_replicas,
            "metrics": [{"type": "Resource", "resource": {"name": "cpu", "target": {
                "type": "Utilization", "averageUtilization": HPA_CPU_UTILIZATION}}}],
            "behavior": {"scaleDown": {"stabilizationWindowSeconds": a.cooldown_seconds}},
        },
    }


def budget(org: Organism, component: str, max_unavailable: int | str) -> dict[str, Any]:
    """maxUnavailable >= 1 and AlwaysAllow for unready pods: this budget never blocks a drain."""
    name = worker_name(org.name) if component == "worker" else pump_name(org.name)
    return {
        "apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": _meta(org, name, component),
        "spec": {"maxUnavailable": max_unavailable,
                 "selector": {"matchLabels": selector_labels(org.name, component)},  # type: ignore[arg-type]
                 "unhealthyPodEvictionPolicy": "AlwaysAllow"},
    }
