"""Rotation of an organism's client password (its binding Secret): the steps the reconciler performs.

On the shared Redis the client password rotates with the organism's own (reconcile.Reconciler._client);
on a dedicated Redis there is no organism rotation to ride on (its pods log in as `default`), so the
rotate-credentials annotation rotates the client password alone, here. Either way the order is the
pods' one (rotation.py): the binding Secret records the new password (`password-next`) before Redis
changes; Redis accepts old and new; the binding hands out the new one (`password`, the old one's digest
in `password-previous-sha256`, the time in `rotated-at`); both stay accepted until every client
workload has the new password (desired/binding.stale_clients); then Redis forgets the old one, then the
binding its digest. Every step is idempotent: a crash anywhere resumes at the right one.

While an overlap runs, each pass (also the periodic resync) re-applies the accepted passwords, so a
dedicated Redis restarted meanwhile (which starts with the binding's `password` only) accepts the old one
again.
"""
from __future__ import annotations

import base64
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from . import rotation, status as st
from .apply import Outcome
from .desired import binding as binding_mod
from .desired.naming import PASSWORD_KEY
from .kube import Kube
from .model import Organism
from .redis_admin import TenantState
from .tenancy.dedicated_client import DedicatedClientAdmin

logger = logging.getLogger(__name__)
CONDITION = "ClientCredentialsCurrent"


@dataclass
class ClientRotation:
    """What one pass did about the client password: a condition while a rotation runs, event texts."""

    condition: st.Condition | None = None
    events: list[str] = field(default_factory=list)


def patch_binding(kube: Kube, org: Organism, values: dict[str, str], changes: Mapping[str, str | None]) -> None:
    """Write `changes` (None deletes a key) into the binding Secret and into `values`."""
    data = {k: (None if v is None else base64.b64encode(v.encode()).decode()) for k, v in changes.items()}
    kube.patch("Secret", org.namespace, binding_mod.binding_name(org.name), {"data": data})
    for k, v in changes.items():
        if v is None:
            values.pop(k, None)
        else:
            values[k] = v


def stale_clients(kube: Kube, org: Organism, values: Mapping[str, str], now: str, binding_sync: float) -> list[str]:
    """The organism's client workloads that may still hold the old password (one LIST per kind)."""
    workloads: list[Mapping[str, Any]] = []
    for kind in ("Deployment", "StatefulSet"):
        workloads += [{**w, "kind": kind} for w in kube.list(kind, org.namespace)]
    return binding_mod.stale_clients(workloads, org.name, values.get(binding_mod.ROTATED_AT_KEY), now,
                                     binding_sync=binding_sync)


def waiting_condition(stale: list[str]) -> st.Condition:
    shown = ", ".join(stale[:5]) + (f" and {len(stale) - 5} more" if len(stale) > 5 else "")
    return st.Condition(CONDITION, "False", "WaitingForClients",
                        f"the binding holds a new client password; the old one stays accepted until these client "
                        f"workloads have restarted with it (kubectl rollout restart): {shown}")


def rotate_dedicated(kube: Kube, admin: DedicatedClientAdmin, org: Organism, body: Mapping[str, Any],
                     credentials: Mapping[str, str], values: dict[str, str], endpoint: str, binding_outcome: Outcome,
                     now: str, *, binding_sync: float = binding_mod.BINDING_SYNC_SECONDS) -> ClientRotation:
    """The client password of an organism on a dedicated Redis: follow the rotate-credentials annotation
    (desired/binding.dedicated_rotation_step), and apply a password replaced by hand (the `password` key
    deleted) at once. Idle passes do not connect to the Redis."""
    assert org.redis is not None
    out = ClientRotation()
    request = ((body.get("metadata") or {}).get("annotations") or {}).get(rotation.ROTATE_ANNOTATION)
    request = str(request) if request else None
    username, prefix = values[binding_mod.USERNAME_KEY], org.redis.prefix

    def accept(extra: frozenset[str]) -> TenantState:
        state = admin.ensure_client(endpoint, credentials.get(PASSWORD_KEY, ""), username,
                                    values[binding_mod.PASSWORD_KEY], prefix, extra)
        if not state.ready:
            logger.warning("Organism %s/%s: %s", org.namespace, org.name, state.message)
        return state

    def failed(state: TenantState, doing: str) -> ClientRotation:
        out.condition = st.Condition(CONDITION, "False", state.reason, f"{doing}: {state.message}; retrying on the "
                                     "next pass (the client password in use keeps working)")
        return out

    step = binding_mod.dedicated_rotation_step(request, values)
    if step is None:
        if "data.password" in binding_outcome.changed:  # replaced by hand: Redis takes the new one at once
            state = accept(frozenset())
            if not state.ready:
                return failed(state, "the binding's new client password is not accepted by Redis yet")
            out.events.append("The binding's client password was replaced; the dedicated Redis accepts only the "
                              "new one")
        return out
    if step == "generate":
        patch_binding(kube, org, values, {binding_mod.NEXT_PASSWORD_KEY: binding_mod.generate_password()})
        out.events.append("Client password rotation requested: generated a new client password")
        step = "publish"
    if step == "publish":
        state = accept(binding_mod.accepted_besides_password(values))  # Redis before the Secret
        if not state.ready:
            return failed(state, "the dedicated Redis is to accept the new client password beside the old one")
        patch_binding(kube, org, values, binding_mod.client_publish_patch(values, request, now))
        out.events.append("The dedicated Redis accepts the new client password; it is in the binding; the old "
                          "one stays accepted until the client workloads have it")
    return finish_overlap(kube, org, values, now, accept, out, binding_sync=binding_sync)


def finish_overlap(kube: Kube, org: Organism, values: dict[str, str], now: str,
                   accept: Callable[[frozenset[str]], TenantState], out: ClientRotation, *,
                   binding_sync: float) -> ClientRotation:
    """While old and new client passwords are both accepted: keep them (Redis first), or, once no client
    workload can hold the old one any more, retire it (Redis, then the binding)."""
    if not values.get(binding_mod.PREVIOUS_PASSWORD_HASHES_KEY):
        return out
    stale = stale_clients(kube, org, values, now, binding_sync)
    if stale:
        state = accept(binding_mod.accepted_besides_password(values))
        out.condition = waiting_condition(stale) if state.ready else st.Condition(
            CONDITION, "False", state.reason, state.message)
        return out
    state = accept(frozenset())
    if not state.ready:
        out.condition = st.Condition(CONDITION, "False", state.reason, state.message)
        return out
    patch_binding(kube, org, values, {binding_mod.PREVIOUS_PASSWORD_HASHES_KEY: None,
                                      binding_mod.ROTATED_AT_KEY: None})
    out.events.append("Every client workload has the new client password; the old one was removed from Redis")
    return out
