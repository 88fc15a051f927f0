"""The Organism's status: conditions per the Kubernetes API conventions, phase, observedGeneration.

Pure functions: observed facts in, the status document out. lastTransitionTime only moves when a
condition's status changes, and `status_patch` returns None when nothing changed, so an idle
resync writes nothing.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from xml_pipeline.contract import redis_mode

from .desired import DesiredState
from .desired.naming import selector_labels
from .model import Organism

ConditionStatus = Literal["True", "False", "Unknown"]
#: Status keys the operator owns (a merge patch sets the ones it drops to null).
STATUS_KEYS = ("observedGeneration", "phase", "configHash", "workersReady", "workerReplicas", "workerSelector",
               "redis", "credentials", "binding", "conditions")


@dataclass(frozen=True)
class Event:
    """A Kubernetes Event a pass attaches to its Organism."""

    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass(frozen=True)
class Condition:
    type: str
    status: ConditionStatus
    reason: str
    message: str

    @property
    def ok(self) -> bool:
        return self.status == "True"


@dataclass(frozen=True)
class WorkloadState:
    """What a Deployment or StatefulSet reports about its pods."""

    name: str
    desired: int
    ready: int
    updated: int
    rolled_out: bool  # the controller has seen the current spec (observedGeneration >= generation)

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> "WorkloadState":
        spec, st, meta = body.get("spec") or {}, body.get("status") or {}, body.get("metadata") or {}
        generation = meta.get("generation")
        observed = st.get("observedGeneration")
        return cls(
            name=str(meta.get("name", "")),
            desired=int(spec.get("replicas", 1)),
            ready=int(st.get("readyReplicas") or 0),
            updated=int(st.get("updatedReplicas") or 0),
            # No observedGeneration yet: the controller has not reported at all (a fresh object).
            rolled_out=generation is None or observed is None or int(observed) >= int(generation),
        )

    @property
    def available(self) -> bool:
        return self.rolled_out and self.ready >= self.desired and self.updated >= self.desired


# ---------------------------------------------------------------------------------------- conditions
def redis_condition_local(org: Organism, redis: WorkloadState | None) -> Condition | None:
    """RedisReady for the cases the operator can see by itself (no Redis, dedicated Redis)."""
    if org.redis is None:
        return Condition("RedisReady", "True", "NotRequired", f"backend type {org.backend_type} does not use Redis")
    if org.redis.mode != "dedicated":
        return None
    if redis is None:
        return Condition("RedisReady", "False", "RedisPending", "the dedicated Redis is not created yet")
    if redis.available:
        return Condition("RedisReady", "True", "RedisAvailable", f"{redis.name} is ready")
    return Condition("RedisReady", "False", "RedisStarting",
                     f"{redis.name}: {redis.ready}/{redis.desired} pods ready"
                     + ("" if redis.rolled_out else ", rollout in progress"))


def pump_condition(pump: WorkloadState | None) -> Condition:
    if pump is None:
        return Condition("PumpReady", "False", "PumpPending", "the pump Deployment is not created yet")
    if pump.available:
        return Condition("PumpReady", "True", "PumpAvailable", f"{pump.name} is ready")
    return Condition("PumpReady", "False", "PumpStarting" if pump.rolled_out else "RollingOut",
                     f"{pump.name}: {pump.ready}/{pump.desired} pods ready")


def workers_condition(org: Organism, workers: WorkloadState | None) -> Condition:
    if org.workers is None:
        return Condition("WorkersReady", "True", "NoWorkers", "no worker pods requested (spec.workers)")
    wanted = org.workers.replicas if org.workers.autoscaling is None else (workers.desired if workers else 1)
    if wanted == 0:
        return Condition("WorkersReady", "True", "ScaledToZero",
                         "spec.workers.replicas is 0" if org.workers.autoscaling is None
                         else "the autoscaler scaled the workers to zero (no task queued)")
    if workers is None:
        return Condition("WorkersReady", "False", "WorkersPending", "the worker Deployment is not created yet")
    if workers.available:
        return Condition("WorkersReady", "True", "WorkersAvailable",
                         f"{workers.ready}/{workers.desired} worker pods ready")
    return Condition("WorkersReady", "False", "WorkersStarting" if workers.rolled_out else "RollingOut",
                     f"{workers.ready}/{workers.desired} worker pods ready")


def autoscaling_condition(org: Organism, autoscaler: str | None) -> Condition | None:
    """Autoscaling (only when spec.workers.autoscaling is set): who scales the workers, and what
    the configuration cannot do without KEDA. Informational: it does not count towards Ready."""
    if org.workers is None or org.workers.autoscaling is None:
        return None
    a = org.workers.autoscaling
    if autoscaler == "keda":
        return Condition("Autoscaling", "True", "KedaScaledObject",
                         f"KEDA scales the workers between {a.min_replicas} and {a.max_replicas} replicas on the "
                         f"tasks stream (target {a.tasks_per_replica} unfinished tasks per replica); the operator "
                         "does not write the worker replicas")
    if a.min_replicas == 0:
        return Condition("Autoscaling", "True", "HpaScaleToZeroNeedsKeda",
                         f"a HorizontalPodAutoscaler scales the workers on CPU between 1 and {a.max_replicas} "
                         "replicas: scaling to zero (minReplicas 0) needs KEDA, which this cluster does not serve")
    return Condition("Autoscaling", "True", "HorizontalPodAutoscaler",
                     f"a HorizontalPodAutoscaler scales the workers on CPU between {a.min_replicas} and "
                     f"{a.max_replicas} replicas (KEDA's API is not served: install KEDA to scale on queued tasks)")


def ready_condition(parts: Sequence[Condition], blocked: Condition | None = None) -> Condition:
    if blocked is not None:
        return Condition("Ready", "False", blocked.reason, blocked.message)
    failing = [c for c in parts if not c.ok]
    if not failing:
        return Condition("Ready", "True", "OrganismReady", "Redis, pump and workers are ready")
    return Condition("Ready", "False", failing[0].reason, "; ".join(f"{c.type}: {c.message}" for c in failing))


# --------------------------------------------------------------------------------------------- status
def build_status(*, previous: Mapping[str, Any], generation: int, now: str,
                 org: Organism | None, desired: DesiredState | None,
                 redis: Condition | None, pump: Condition | None, workers: Condition | None,
                 blocked: Condition | None, failed: bool, workers_state: WorkloadState | None,
                 extra: Sequence[Condition] = ()) -> dict[str, Any]:
    """The full status document. A None condition keeps its previous value (e.g. while the spec is
    invalid, the running pods' conditions stay as they were last observed). `extra` conditions (e.g.
    CredentialsCurrent in shared mode) follow Ready and do not count towards it."""
    old = {c.get("type"): c for c in previous.get("conditions") or [] if isinstance(c, Mapping)}
    chosen: dict[str, Condition | None] = {"RedisReady": redis, "PumpReady": pump, "WorkersReady": workers}
    parts: list[Condition] = []
    for ctype, cond in chosen.items():
        if cond is None and ctype in old:
            o = old[ctype]
            cond = Condition(ctype, o.get("status", "Unknown"), o.get("reason", "Unknown"), o.get("message", ""))
        if cond is None:
            cond = Condition(ctype, "Unknown", "NotObserved", "not observed yet")
        parts.append(cond)
    ready = ready_condition(parts, blocked)

    conditions = [_condition_dict(c, old.get(c.type), generation, now) for c in [*parts, ready, *extra]]
    status: dict[str, Any] = {
        "observedGeneration": generation,
        "phase": _phase(previous.get("phase"), ready, failed, pump),
        "conditions": conditions,
    }
    if desired is not None and org is not None:
        status["configHash"] = desired.config_hash
        if org.workers is not None:
            ready_n = workers_state.ready if workers_state else 0
            wanted = org.workers.replicas if org.workers.autoscaling is None else (
                workers_state.desired if workers_state else 0)
            status["workersReady"] = f"{ready_n}/{wanted}"
            # The Organism's /scale subresource reads these (statusReplicasPath, labelSelectorPath).
            status["workerReplicas"] = workers_state.desired if workers_state else 0
            status["workerSelector"] = ",".join(f"{k}={v}" for k, v in selector_labels(org.name, "worker").items())
        else:
            status["workersReady"] = "0/0"
        if org.redis is not None:
            status["redis"] = {"mode": org.redis.mode, "endpoint": desired.endpoint, "prefix": org.redis.prefix,
                               "ttl": org.redis.ttl, "secretName": desired.secret_name,
                               "topology": redis_mode(desired.endpoint or "")}
    else:  # the spec could not be read: keep what describes the running objects
        for key in ("configHash", "workersReady", "redis", "credentials"):
            if key in previous:
                status[key] = previous[key]
        status["conditions"] += [c for c in previous.get("conditions") or []
                                 if isinstance(c, Mapping) and c.get("type") not in (*chosen, "Ready")]
    return status


def _phase(previous: Any, ready: Condition, failed: bool, pump: Condition | None) -> str:
    if failed:
        return "Failed"
    if ready.ok:
        return "Ready"
    if previous in ("Ready", "Degraded"):
        return "Degraded"
    if pump is not None and pump.reason == "PumpPending":
        return "Pending"
    return "Provisioning"


def _condition_dict(c: Condition, old: Mapping[str, Any] | None, generation: int, now: str) -> dict[str, Any]:
    since = old.get("lastTransitionTime") if old and old.get("status") == c.status else None
    return {"type": c.type, "status": c.status, "observedGeneration": generation,
            "lastTransitionTime": since or now, "reason": c.reason, "message": c.message[:32768]}


def status_patch(previous: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any] | None:
    """Merge patch for .status, or None when the operator's part of it is unchanged."""
    patch: dict[str, Any] = {}
    for key in STATUS_KEYS:
        if key in new:
            if previous.get(key) != new[key]:
                patch[key] = new[key]
        elif key in previous:
            patch[key] = None
    return patch or None


def condition(status: Mapping[str, Any], ctype: str) -> Mapping[str, Any] | None:
    for c in status.get("conditions") or []:
        if isinstance(c, Mapping) and c.get("type") == ctype:
            return c
    return None
