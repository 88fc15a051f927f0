"""A password rotation as one reconcile pass sees it: its phase, the steps the pass took, and what
it reports (the CredentialsCurrent condition, status.credentials, events). rotation.py holds the
decisions; reconcile.py performs them."""
from __future__ import annotations

import datetime
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from . import rotation, status as st


@dataclass
class RotationPass:
    """A password rotation as one pass sees it (rotation.py holds the decisions)."""

    phase: rotation.Phase
    request: str | None = None
    since: str | None = None
    last: str | None = None
    waited: float = 0.0
    #: Steps taken in this pass, for events: started, adopted, published, retired.
    done: list[str] = field(default_factory=list)
    #: Nodes of a clustered shared Redis where this pass re-created the lost ACL user (an event).
    repaired: tuple[str, ...] = ()

    def stalled(self, timeout: float) -> bool:
        return self.phase is rotation.Phase.ROLLING_OUT and self.waited >= timeout

    def as_status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"phase": self.phase.value}
        for key, value in (("request", self.request), ("since", self.since), ("lastRotation", self.last)):
            if value:
                out[key] = value
        return out

    def condition(self, timeout: float) -> st.Condition:
        if self.phase is rotation.Phase.IDLE:
            return st.Condition("CredentialsCurrent", "True", "NoRotation",
                                "no password rotation in progress (request one by setting the annotation "
                                f"{rotation.ROTATE_ANNOTATION} to a new value)")
        if self.phase is rotation.Phase.ACCEPTING:
            return st.Condition("CredentialsCurrent", "False", "Rotating",
                                "a new password was generated; the shared Redis is to accept it beside the old one")
        if self.stalled(timeout):
            return st.Condition("CredentialsCurrent", "False", "RolloutTimedOut",
                                f"the pump and worker pods have not all moved to the new password after "
                                f"{int(self.waited)} s; both passwords stay accepted (no pod is locked out) "
                                "until they do: check the Deployments")
        return st.Condition("CredentialsCurrent", "False", "Rotating",
                            "the new password is in the Secret and the pods are rolling; the old password "
                            "stays accepted until every pod runs with the new one")

    def events_for(self, previous: Mapping[str, Any], status: Mapping[str, Any]) -> list[st.Event]:
        texts = {"started": "Password rotation requested: generating a new password",
                 "adopted": "redis-password was changed in the Secret: the old password stays accepted "
                            "until the pods rolled",
                 "published": "The shared Redis accepts the new password; it is in the Secret; rolling the pods",
                 "retired": "Every pod runs with the new password; the old one was removed from the shared Redis"}
        events = [st.Event("Normal", "CredentialsRotation", texts[d]) for d in self.done]
        if self.repaired:
            events.append(st.Event("Warning", "AclUserRepaired",
                                f"The organism's ACL user was missing on node(s) {', '.join(self.repaired)} of the "
                                "shared Redis (a restart without an ACL file?) and was re-created there"))
        old, new = st.condition(previous, "CredentialsCurrent"), st.condition(status, "CredentialsCurrent")
        if new is not None and new["reason"] == "RolloutTimedOut" and (old or {}).get("reason") != "RolloutTimedOut":
            events.append(st.Event("Warning", "RolloutTimedOut", new["message"]))
        return events


def seconds_between(since: str | None, now: str) -> float:
    fmt = "%Y-%m-%dT%H:%M:%SZ"
    try:
        return (datetime.datetime.strptime(now, fmt) - datetime.datetime.strptime(since or now, fmt)).total_seconds()
    except ValueError:
        return 0.0
