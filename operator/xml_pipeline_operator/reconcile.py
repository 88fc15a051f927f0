"""One reconciliation pass for one Organism: read, decide, apply the differences, report.

Level-based and idempotent: the same pass serves create, update, resume, the periodic resync and
the reaction to an owned Deployment changing. Objects are applied in dependency order (credentials,
config, Redis, pump, workers); names are deterministic, so an interrupted pass that runs again
finds what it created before and never duplicates it.
"""
from __future__ import annotations

import base64
import datetime
import logging
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from xml_pipeline.contract import LABEL_COMPONENT

from . import apply, client_rotation, desired as desired_mod, rotation, status as st
from .rotation_pass import RotationPass, seconds_between
from .status import Event
from .desired import binding as binding_mod
from .desired.naming import CONFIG_HASH_ANNOTATION, PASSWORD_KEY
from .kube import Kube, NotFound
from .model import Organism, SpecError, check_prefix_unchanged, parse_organism
from .probe import probe_topology
from .redis_admin import PASSWORD_CHANGED, RedisAdmin, Tenant, TenantState
from .settings import OperatorSettings
from .tenancy.dedicated_client import DedicatedClientAdmin

logger = logging.getLogger(__name__)
#: How long the answer to "does the cluster serve KEDA's API" is trusted.
KEDA_RECHECK_SECONDS = 300.0


@dataclass
class Result:
    status: dict[str, Any]
    events: list[Event] = field(default_factory=list)
    #: Set when the pass could not finish for a reason that may go away (missing Secret, name
    #: conflict): the caller retries with backoff.
    retry: str | None = None
    #: The Organism as read at the start of the pass (events are attached to it).
    body: Mapping[str, Any] = field(default_factory=dict)


def utcnow() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Reconciler:
    def __init__(self, kube: Kube, settings: OperatorSettings, admin: RedisAdmin,
                 clock: Callable[[], str] = utcnow) -> None:
        self.kube, self.settings, self.admin, self.clock = kube, settings, admin, clock
        #: How long a rotation waits for the pods before saying so (it keeps waiting, never locks out).
        self.rotation_timeout = rotation.ROLLOUT_TIMEOUT_SECONDS
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._keda: tuple[bool, float] | None = None
        #: Client users on dedicated Redis servers, changed while they run (rotation; tests map the address).
        self.dedicated = DedicatedClientAdmin()
        #: Seconds the kubelet may take to refresh a mounted binding (client_rotation; short in tests).
        self.binding_sync = binding_mod.BINDING_SYNC_SECONDS

    def _keda_served(self) -> bool:
        """KEDA's ScaledObject API is served (checked at most every KEDA_RECHECK_SECONDS: discovery
        is a GET on every pass otherwise)."""
        now = time.monotonic()
        with self._locks_guard:
            if self._keda is not None and now - self._keda[1] < KEDA_RECHECK_SECONDS:
                return self._keda[0]
        if self.settings.autoscaler != "auto":
            served = self.settings.autoscaler == "keda"
        else:
            served = self.kube.serves("keda.sh/v1alpha1", "scaledobjects")
        with self._locks_guard:
            self._keda = (served, now)
        return served

    def lock(self, namespace: str, name: str) -> threading.Lock:
        """Handlers of one Organism (change, timer, Deployment events, deletion) run one at a time."""
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
            invalid = st.Condition("Ready", "False", e.reason, str(e))
            status = st.build_status(previous=previous, generation=generation, now=now, org=None, desired=None,
                                     redis=None, pump=None, workers=None, blocked=invalid, failed=True,
                                     workers_state=None)
            if previous.get("binding"):  # clients keep their binding while the last good spec serves
                status["binding"] = previous["binding"]
            return self._finish(namespace, name, previous, status, [], retry=None)

        # Also without autoscaling: leftover KEDA objects (autoscaling switched off) are removed.
        keda = self._keda_served() if org.workers is not None and org.redis is not None else False
        want = desired_mod.build(org, self.settings, keda=keda)
        outcomes: list[apply.Outcome] = []
        blocked: st.Condition | None = None
        retry: str | None = None
        redis_cond: st.Condition | None = None
        rot: RotationPass | None = None
        binding: dict[str, str] | None = None
        clients = client_rotation.ClientRotation()
        client_credentials: dict[str, str] | None = None  # dedicated: status.credentials (the client's rotation)
        previous = dict(previous)  # a rotation start writes status.credentials early (see _shared)
        try:
            shared_ca = self.settings.shared_redis_ca if org.redis is not None and org.redis.mode == "shared" else None
            secret_outcome, values = apply.ensure_credentials(self.kube, org, shared_ca)
            outcomes.append(secret_outcome)
            if org.redis is not None and org.redis.mode == "shared":
                redis_cond, rot = self._shared(org, body, previous, values, now)
                if redis_cond.ok:  # Redis knows the Secret's password: the pods may roll to it
                    want = desired_mod.build(org, self.settings, keda=keda,
                                             credentials_digest=rotation.credentials_digest(values))
                    binding = self._client(org, values, want, outcomes, rot, clients, now)
            else:
                if org.redis is not None and org.redis.mode == "dedicated" and want.endpoint is not None:
                    # Before the Redis workload: its config's client `user` line reads the password.
                    outcome, b = apply.ensure_binding(self.kube, org, want.endpoint, values)
                    outcomes.append(outcome)
                    binding = {"name": binding_mod.binding_name(org.name)}
                    clients = client_rotation.rotate_dedicated(self.kube, self.dedicated, org, body, values, b,
                                                               want.endpoint, outcome, now,
                                                               binding_sync=self.binding_sync)
                    if b.get(binding_mod.ROTATION_REQUEST_KEY):  # the request acted upon (handlers.py)
                        client_credentials = {"phase": rotation.Phase.IDLE.value,
                                              "request": b[binding_mod.ROTATION_REQUEST_KEY]}
                redis_cond = self._remote_redis_condition(org, values)
            if redis_cond is not None and redis_cond.reason == "ExternalSecretMissing":
                blocked, retry = redis_cond, redis_cond.message
            elif redis_cond is not None and redis_cond.reason in ("ExternalRedisAuthFailed", "ExternalRedisUnreachable"):
                retry = redis_cond.message  # the pods are rolled out anyway; probe again with backoff
            outcomes.append(apply.apply_object(self.kube, want.config_map, org.uid))
            if blocked is None:  # pods could not start without their Secret; wait for it
                for obj in want.workloads:
                    key = (obj["kind"], obj["metadata"]["name"])
                    outcomes.append(apply.apply_object(self.kube, obj, org.uid, want.create_only.get(key, ())))
                # Budgets and autoscalers become unnecessary only through a spec change: while the
                # generation is the one the last written status handled, nothing can have left one
                # behind (deletions happen before that status is written), so idle passes skip the GETs.
                handled = previous.get("observedGeneration") == generation and previous.get("phase") != "Failed"
                for kind, obj_name in want.absent + ([] if handled else want.absent_after_change):
                    gone = apply.delete_if_owned(self.kube, kind, namespace, obj_name, org.uid)
                    if gone is not None:
                        outcomes.append(gone)
            if rot is not None and redis_cond is not None and redis_cond.ok:
                redis_cond = self._after_rollout(org, rot, values, outcomes, want, now) or redis_cond
                if "retired" in rot.done and binding is not None:  # the client's old password goes too
                    binding = self._client(org, values, want, [], rot, clients, now) or binding
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
            blocked=blocked, failed=False, workers_state=worker_state,
            extra=([rot.condition(self.rotation_timeout)] if rot is not None else [])
            + [c for c in [st.autoscaling_condition(org, want.autoscaler), clients.condition] if c is not None])
        if rot is not None:
            status["credentials"] = rot.as_status()
        elif client_credentials is not None:
            status["credentials"] = client_credentials
        if binding is not None:
            status["binding"] = binding
        elif org.redis is not None and org.redis.mode == "shared" and previous.get("binding"):
            status["binding"] = previous["binding"]  # Redis unreachable this pass: the binding still holds
        events = (_object_events(outcomes) + (rot.events_for(previous, status) if rot is not None else [])
                  + [Event("Normal", "ClientCredentialsRotation", text) for text in clients.events])
        return self._finish(namespace, name, previous, status, events, retry=retry)

    # ------------------------------------------------------------------------------------ shared mode
    def _shared(self, org: Organism, body: Mapping[str, Any], previous: dict[str, Any], values: dict[str, str],
                now: str) -> tuple[st.Condition, RotationPass]:
        """The Organism's ACL user, and the steps of a password rotation that come before the pods roll
        (rotation.py): start, generate, accept, publish -- Redis always before the Secret."""
        assert org.redis is not None
        cred = previous.get("credentials") or {}
        rot = RotationPass(phase=rotation.phase_of(cred.get("phase"), values), request=cred.get("request"),
                        since=cred.get("since"), last=cred.get("lastRotation"))
        annotations = (body.get("metadata") or {}).get("annotations") or {}
        def before_redis(request: bool) -> rotation.Step:  # the steps that come before Redis is asked
            return rotation.next_step(phase=rot.phase, request=request, secret=values, redis_accepts_all=False,
                                      rolled=None, waited=0.0)
        if before_redis(rotation.request_pending(annotations, rot.request)) is rotation.Step.START:
            # The intent is durable before anything changes: a restart from here on carries on.
            rot.request, rot.phase, rot.since = str(annotations[rotation.ROTATE_ANNOTATION]), rotation.Phase.ACCEPTING, now
            self.kube.patch("Organism", org.namespace, org.name, {"status": {"credentials": rot.as_status()}},
                            subresource="status")
            previous["credentials"] = rot.as_status()
            rot.done.append("started")
        if before_redis(False) is rotation.Step.GENERATE:
            self._patch_secret(org, values, {rotation.NEXT_KEY: secrets.token_hex(32)})
        tenant = Tenant(namespace=org.namespace, name=org.name, prefix=org.redis.prefix,
                        username=values.get("redis-username", ""), uid=org.uid)
        for _ in range(4):  # at most: adopt a hand edit, publish, settle
            state = self.admin.ensure_tenant(tenant, values.get(PASSWORD_KEY, ""),
                                             rotation.accepted_besides_password(values))
            rot.repaired += tuple(n for n in state.repaired if n not in rot.repaired)
            if state.reason == PASSWORD_CHANGED and state.still_accepted:
                # redis-password was edited by hand: record what Redis accepts now, then keep it.
                self._patch_secret(org, values, rotation.adopt_patch(values, state.still_accepted))
                rot.phase, rot.since = rotation.Phase.ROLLING_OUT, now
                rot.done.append("adopted")
                continue
            step = rotation.next_step(phase=rot.phase, request=False, secret=values, redis_accepts_all=state.ready,
                                      rolled=None, waited=0.0)
            if step is rotation.Step.PUBLISH:
                self._patch_secret(org, values, rotation.publish_patch(values))
                rot.phase, rot.since = rotation.Phase.ROLLING_OUT, now
                rot.done.append("published")
                continue  # once more: the admin's record (for recovery) follows the new Secret
            break
        if rot.phase is rotation.Phase.IDLE and cred.get("phase") not in (None, rotation.Phase.IDLE.value):
            rot.since = None  # the Secret shows the last rotation finished (a restart after retiring)
        return st.Condition("RedisReady", "True" if state.ready else "False", state.reason, state.message), rot

    def _client(self, org: Organism, values: dict[str, str], want: desired_mod.DesiredState,
                outcomes: list[apply.Outcome], rot: RotationPass, clients: client_rotation.ClientRotation,
                now: str) -> dict[str, str] | None:
        """The organism's client identity (shared mode): the binding Secret, then its ACL user, its
        password rotated with the organism's (desired/binding.client_rotation_step; Redis always
        before the Secret). Returns status.binding once Redis knows the client's password, else None."""
        assert org.redis is not None
        if want.endpoint is None:
            return None
        outcome, b = apply.ensure_binding(self.kube, org, want.endpoint, values)
        outcomes.append(outcome)
        tenant = Tenant(namespace=org.namespace, name=org.name, prefix=org.redis.prefix,
                        username=values.get("redis-username", ""), uid=org.uid)

        def state_of(extra: frozenset[str]) -> TenantState:
            state = self.admin.ensure_client(tenant, b[binding_mod.USERNAME_KEY], b[binding_mod.PASSWORD_KEY], extra)
            if not state.ready:
                logger.warning("Organism %s/%s: %s", org.namespace, org.name, state.message)
            return state

        def accept(extra: frozenset[str]) -> bool:
            return state_of(extra).ready

        step = binding_mod.client_rotation_step(rot.phase.value, rot.request, b)
        if step == "generate":
            self._patch_binding(org, b, {binding_mod.NEXT_PASSWORD_KEY: binding_mod.generate_password()})
            step = "publish"
        if step == "publish":
            if not accept(binding_mod.accepted_besides_password(b)):
                return None
            self._patch_binding(org, b, binding_mod.client_publish_patch(b, rot.request, now))
        elif step == "retire":  # the organism's pods rolled; the clients' turn (client_rotation.py)
            client_rotation.finish_overlap(self.kube, org, b, now, state_of, clients, binding_sync=self.binding_sync)
        if not accept(binding_mod.accepted_besides_password(b)):
            return None
        return {"name": binding_mod.binding_name(org.name)}

    def _patch_binding(self, org: Organism, values: dict[str, str], changes: Mapping[str, str | None]) -> None:
        """Write `changes` (None deletes a key) into the binding Secret and into `values`."""
        data = {k: (None if v is None else base64.b64encode(v.encode()).decode()) for k, v in changes.items()}
        self.kube.patch("Secret", org.namespace, binding_mod.binding_name(org.name), {"data": data})
        for k, v in changes.items():
            if v is None:
                values.pop(k, None)
            else:
                values[k] = v

    def _after_rollout(self, org: Organism, rot: RotationPass, values: dict[str, str],
                       outcomes: list[apply.Outcome], want: desired_mod.DesiredState, now: str) -> st.Condition | None:
        """Rotation steps after the pods were told to roll: wait for them, then retire the old password."""
        assert org.redis is not None
        digest = rotation.credentials_digest(values)
        if rot.phase is not rotation.Phase.ROLLING_OUT or digest is None:
            return None
        bodies = {(o.kind, o.name): o.body for o in outcomes if o.action != "deleted"}
        pods = [bodies.get(("Deployment", obj["metadata"]["name"])) for obj in want.workloads
                if obj["kind"] == "Deployment"
                and obj["metadata"]["labels"].get(LABEL_COMPONENT) in ("pump", "worker")]
        rolled = bool(pods) and all(rotation.rollout_complete(b, digest) for b in pods)
        rot.waited = seconds_between(rot.since, now)
        step = rotation.next_step(phase=rot.phase, request=False, secret=values, redis_accepts_all=True,
                                  rolled=rolled, waited=rot.waited, timeout=self.rotation_timeout)
        if step is not rotation.Step.RETIRE:
            return None
        tenant = Tenant(namespace=org.namespace, name=org.name, prefix=org.redis.prefix,
                        username=values.get("redis-username", ""), uid=org.uid)
        state = self.admin.ensure_tenant(tenant, values.get(PASSWORD_KEY, ""), frozenset())  # Redis first
        if state.ready:
            self._patch_secret(org, values, {rotation.PREVIOUS_KEY: None})
            rot.phase, rot.since, rot.last = rotation.Phase.IDLE, None, now
            rot.done.append("retired")
        return st.Condition("RedisReady", "True" if state.ready else "False", state.reason, state.message)

    def _patch_secret(self, org: Organism, values: dict[str, str], changes: Mapping[str, str | None]) -> None:
        """Write `changes` (None deletes a key) into the credentials Secret and into `values`."""
        data = {k: (None if v is None else base64.b64encode(v.encode()).decode()) for k, v in changes.items()}
        self.kube.patch("Secret", org.namespace, desired_mod.naming.secret_name(org.name), {"data": data})
        for k, v in changes.items():
            if v is None:
                values.pop(k, None)
            else:
                values[k] = v

    # ------------------------------------------------------------------------------------------
    def _remote_redis_condition(self, org: Organism, values: Mapping[str, str]) -> st.Condition | None:
        """RedisReady for an external Redis: its Secret is there, and (unless switched off) a PING
        with the pods' URL and credentials answers (probe.py)."""
        if org.redis is None or org.redis.mode == "dedicated":
            return None
        if org.redis.mode == "external":
            ext = org.redis.external
            assert ext is not None
            found: dict[str, str] = {}
            for ref, what in ((ext.password, "passwordSecretRef"), (ext.username, "usernameSecretRef"),
                              (ext.ca, "caSecretRef")):
                if ref is None:
                    continue
                secret = self.kube.get("Secret", org.namespace, ref.name)
                if secret is None:
                    return st.Condition("RedisReady", "False", "ExternalSecretMissing",
                                        f"Secret {ref.name!r} (spec.backend.redis.external.{what}) does not exist "
                                        "in this namespace; retrying with backoff")
                data = secret.get("data") or {}
                if ref.key not in data:
                    return st.Condition("RedisReady", "False", "ExternalSecretMissing",
                                        f"Secret {ref.name!r} has no key {ref.key!r} "
                                        f"(spec.backend.redis.external.{what}.key); retrying with backoff")
                found[what] = base64.b64decode(data[ref.key]).decode("utf-8", "replace")
            if not self.settings.probe_external_redis:
                return st.Condition("RedisReady", "True", "ExternalRedisConfigured",
                                    f"pods use {ext.url}; not probed by the operator (XPO_PROBE_EXTERNAL_REDIS=false)")
            result = probe_topology(ext.url, found.get("usernameSecretRef"), found.get("passwordSecretRef"),
                                    ca=found.get("caSecretRef"))
            user = found.get("usernameSecretRef") or "default"
            if result.ok:
                return st.Condition("RedisReady", "True", "ExternalRedisReachable",
                                    f"the operator reached {ext.url} as user {user!r} ({result.detail}); "
                                    "pods use the same URL and credentials")
            if result.outcome == "AuthFailed":
                return st.Condition("RedisReady", "False", "ExternalRedisAuthFailed",
                                    f"{ext.url} refused user {user!r} with the password from Secret "
                                    f"{ext.password.name!r} (spec.backend.redis.external.passwordSecretRef): "
                                    f"{result.detail}; probing again with backoff")
            return st.Condition("RedisReady", "False", "ExternalRedisUnreachable",
                                f"the operator cannot reach {ext.url} ({result.detail}); probing again with "
                                "backoff. If only the operator is kept from it (a NetworkPolicy), set "
                                "XPO_PROBE_EXTERNAL_REDIS=false")
        return None  # shared: _shared

    @staticmethod
    def _state(bodies: Mapping[tuple[str, str], dict[str, Any] | None], want: desired_mod.DesiredState,
               component: str) -> st.WorkloadState | None:
        for obj in want.workloads:
            labels = obj["metadata"]["labels"]
            if labels.get(LABEL_COMPONENT) == component and obj["kind"] in ("Deployment", "StatefulSet"):
                body = bodies.get((obj["kind"], obj["metadata"]["name"]))
                return st.WorkloadState.from_body(body) if body else None
        return None

    def _finish(self, namespace: str, name: str, previous: Mapping[str, Any], status: dict[str, Any],
                events: list[Event], *, retry: str | None) -> Result:
        events = events + _ready_events(previous, status)
        patch = st.status_patch(previous, status)
        if patch is not None:
            try:
                self.kube.patch("Organism", namespace, name, {"status": patch}, subresource="status")
            except NotFound:  # deleted meanwhile: nothing to report on
                pass
        return Result(status=status, events=events, retry=retry)


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
