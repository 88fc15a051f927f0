"""One reconciliation pass for one Organism: read, decide, apply the differences, report.

Level-based and idempotent: the same pass serves create, update, resume, the periodic resync and
the reaction to an owned Deployment changing. Objects are applied in dependency order (credentials,
config, Redis, pump, workers); names are deterministic, so an interrupted pass that runs again
finds what it created before and never duplicates it.
"""
from __future__ import annotations

import datetime
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from . import apply, desired as desired_mod, status as st
from .desired.naming import CONFIG_HASH_ANNOTATION, PASSWORD_KEY
from .kube import ApiError, Kube
from .model import Organism, SpecError, check_prefix_unchanged, parse_organism
from .redis_admin import RedisAdmin, Tenant
from .settings import OperatorSettings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Event:
    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass
class Result:
    status: dict[str, Any]
    events: list[Event] = field(default_factory=list)
    #: Set when the pass could not finish for a reason that may go away (missing Secret, name
    #: conflict): the caller retries with backoff.
    retry: str | None = None
    status_written: bool = False
    #: The Organism as read at the start of the pass (events are attached to it).
    body: Mapping[str, Any] = field(default_factory=dict)


def utcnow() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Reconciler:
    def __init__(self, kube: Kube, settings: OperatorSettings, admin: RedisAdmin,
                 clock: Callable[[], str] = utcnow) -> None:
        self.kube, self.settings, self.admin, self.clock = kube, settings, admin, clock
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def lock(self, namespace: str, name: str) -> threading.Lock:
        """Handlers of one Organism (change, timer, Deployment events) run one at a time."""
        with self._locks_guard:
            return self._locks.setdefault((namespace, name), threading.Lock())

    def forget(self, namespace: str, name: str) -> None:
        with self._locks_guard:
            self._locks.pop((namespace, name), None)

    # ------------------------------------------------------------------------------------------
    def reconcile(self, namespace: str, name: str) -> Result | None:
        """One pass over the Organism's current state; None if it is gone or being deleted.

        The Organism is read inside the per-Organism lock, so a pass always starts from the status
        the previous pass wrote (never from a stale copy delivered with a kopf event).
        """
        with self.lock(namespace, name):
            body = self.kube.get("Organism", namespace, name)
            if body is None or (body.get("metadata") or {}).get("deletionTimestamp"):
                return None
            result = self._reconcile(body, namespace, name)
            result.body = body
            return result

    def _reconcile(self, body: Mapping[str, Any], namespace: str, name: str) -> Result:
        previous: Mapping[str, Any] = body.get("status") or {}
        generation = int((body.get("metadata") or {}).get("generation") or 0)
        now = self.clock()
        try:
            org = parse_organism(body, self.settings)
            check_prefix_unchanged(org, (previous.get("redis") or {}).get("prefix"))
        except SpecError as e:
            # Nothing is changed or deleted: the running objects keep serving the last good spec.
            blocked = st.Condition("Ready", "False", e.reason, str(e))
            status = st.build_status(previous=previous, generation=generation, now=now, org=None, desired=None,
                                     redis=None, pump=None, workers=None, blocked=blocked, failed=True,
                                     workers_state=None)
            return self._finish(namespace, name, previous, status, [], retry=None)

        want = desired_mod.build(org, self.settings)
        outcomes: list[apply.Outcome] = []
        blocked: st.Condition | None = None
        retry: str | None = None
        redis_cond: st.Condition | None = None
        try:
            secret_outcome, values = apply.ensure_credentials(self.kube, org)
            outcomes.append(secret_outcome)
            redis_cond = self._remote_redis_condition(org, values)
            if redis_cond is not None and redis_cond.reason == "ExternalSecretMissing":
                blocked, retry = redis_cond, redis_cond.message
            outcomes.append(apply.apply_object(self.kube, want.config_map, org.uid))
            if blocked is None:  # pods could not start without their Secret; wait for it
                for obj in want.workloads:
                    outcomes.append(apply.apply_object(self.kube, obj, org.uid))
                for kind, obj_name in want.absent:
                    gone = apply.delete_if_owned(self.kube, kind, namespace, obj_name, org.uid)
                    if gone is not None:
                        outcomes.append(gone)
        except apply.NameConflict as e:
            blocked, retry = st.Condition("Ready", "False", "NameConflict", str(e)), str(e)

        bodies = {(o.kind, o.name): o.body for o in outcomes if o.body is not None and o.action != "deleted"}
        redis_state = self._state(bodies, want, "redis")
        pump_state = self._state(bodies, want, "pump")
        worker_state = self._state(bodies, want, "worker")
        status = st.build_status(
            previous=previous, generation=generation, now=now, org=org, desired=want,
            redis=redis_cond or st.redis_condition_local(org, redis_state),
            pump=st.pump_condition(pump_state), workers=st.workers_condition(org, worker_state),
            blocked=blocked, failed=False, workers_state=worker_state)
        return self._finish(namespace, name, previous, status, _object_events(outcomes), retry=retry)

    # ------------------------------------------------------------------------------------------
    def _remote_redis_condition(self, org: Organism, values: Mapping[str, str]) -> st.Condition | None:
        """RedisReady for Redis the operator does not run (external, shared)."""
        if org.redis is None or org.redis.mode == "dedicated":
            return None
        if org.redis.mode == "external":
            ext = org.redis.external
            assert ext is not None
            for ref, what in ((ext.password, "passwordSecretRef"), (ext.username, "usernameSecretRef")):
                if ref is None:
                    continue
                secret = self.kube.get("Secret", org.namespace, ref.name)
                if secret is None:
                    return st.Condition("RedisReady", "False", "ExternalSecretMissing",
                                        f"Secret {ref.name!r} (spec.backend.redis.external.{what}) does not exist "
                                        "in this namespace; retrying with backoff")
                if ref.key not in (secret.get("data") or {}):
                    return st.Condition("RedisReady", "False", "ExternalSecretMissing",
                                        f"Secret {ref.name!r} has no key {ref.key!r} "
                                        f"(spec.backend.redis.external.{what}.key); retrying with backoff")
            return st.Condition("RedisReady", "True", "ExternalRedisConfigured",
                                f"pods use {ext.url}; the operator does not connect to external Redis")
        tenant = Tenant(namespace=org.namespace, name=org.name, prefix=org.redis.prefix,
                        username=values.get("redis-username", ""))
        state = self.admin.ensure_tenant(tenant, values.get(PASSWORD_KEY, ""))
        return st.Condition("RedisReady", "True" if state.ready else "False", state.reason, state.message)

    @staticmethod
    def _state(bodies: Mapping[tuple[str, str], dict[str, Any] | None], want: desired_mod.DesiredState,
               component: str) -> st.WorkloadState | None:
        for obj in want.workloads:
            labels = obj["metadata"]["labels"]
            if labels.get("app.kubernetes.io/component") == component and obj["kind"] != "Service":
                body = bodies.get((obj["kind"], obj["metadata"]["name"]))
                return st.WorkloadState.from_body(body) if body else None
        return None

    def _finish(self, namespace: str, name: str, previous: Mapping[str, Any], status: dict[str, Any],
                events: list[Event], *, retry: str | None) -> Result:
        events = events + _ready_events(previous, status)
        patch = st.status_patch(previous, status)
        written = False
        if patch is not None:
            try:
                self.kube.patch("Organism", namespace, name, {"status": patch}, subresource="status")
                written = True
            except ApiError as e:
                if e.status != 404:  # deleted meanwhile: nothing to report on
                    raise
        return Result(status=status, events=events, retry=retry, status_written=written)


def _object_events(outcomes: list[apply.Outcome]) -> list[Event]:
    """At most one event per kind of action and pass (an event is an API write too: a 200-Organism
    rollout should not cost 1,200 of them)."""
    created = [f"{o.kind} {o.name}" for o in outcomes if o.action == "created"]
    deleted = [f"{o.kind} {o.name}" for o in outcomes if o.action == "deleted"]
    updated, rolling = [], False
    for o in outcomes:
        if o.action == "patched":
            what = ", ".join(o.changed[:4]) + (", ..." if len(o.changed) > 4 else "")
            updated.append(f"{o.kind} {o.name} ({what})")
            rolling = rolling or any(CONFIG_HASH_ANNOTATION in p or ".template." in p for p in o.changed)
    events: list[Event] = []
    if created:
        events.append(Event("Normal", "Created", "Created " + ", ".join(created)))
    if updated:
        events.append(Event("Normal", "Updated", "Updated " + "; ".join(updated)
                            + ("; rolling the pods" if rolling else "")))
    if deleted:
        events.append(Event("Normal", "Deleted", "Deleted " + ", ".join(deleted) + " (no longer needed by the spec)"))
    return events


def _ready_events(previous: Mapping[str, Any], status: Mapping[str, Any]) -> list[Event]:
    """One event per transition of Ready (status or reason), not one per pass."""
    old, new = st.condition(previous, "Ready"), st.condition(status, "Ready")
    if new is None or (old is not None and (old.get("status"), old.get("reason")) == (new["status"], new["reason"])):
        return []
    if new["status"] == "True":
        return [Event("Normal", "Ready", "The organism is ready")]
    if status.get("phase") == "Failed" or new["reason"] in ("NameConflict", "ExternalSecretMissing"):
        return [Event("Warning", new["reason"], new["message"])]
    return []
