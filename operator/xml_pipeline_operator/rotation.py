"""Rotating an Organism's shared-Redis password without locking running pods out: the state machine.

Pure decisions only (the reconciler performs them). The order of a rotation:

1. **Start**: the Organism carries `xml-pipeline.dev/rotate-credentials: <any new value>`; the request
   is recorded in `status.credentials` (phase `Accepting`) before anything else happens.
2. **Generate**: a fresh password goes into the Secret under `redis-password-next` (pods never read
   that key). The Secret is the durable record: a crash from here on never loses the password.
3. **Accept**: Redis accepts old and new (one atomic ACL SETUSER; the ACL user's passwords always
   follow from the Secret: `redis-password`, `redis-password-next`, `redis-password-previous-sha256`).
4. **Publish**: one Secret patch moves the new password to `redis-password` and records the old one's
   SHA-256 (what Redis stores; never the plain text) under `redis-password-previous-sha256`.
5. **Roll**: the pump and worker pod templates carry `xml-pipeline.dev/credentials-digest`, an HMAC of
   the password keyed with the Organism's signing key (so it reveals nothing), which now changes and
   rolls the pods.
6. **Retire**: once every Deployment reports the new template updated and available (and no old pod
   left), Redis forgets the old password, then the Secret drops its digest. Phase back to `Idle`.

A `redis-password` edited by hand takes the same road from step 4 (the old passwords Redis still
accepts are recorded in the Secret first). Pods that never become ready keep both passwords
accepted: after `ROLLOUT_TIMEOUT_SECONDS` the CredentialsCurrent condition says so, nothing is retired.
"""
from __future__ import annotations

import enum
import hashlib
import hmac
from collections.abc import Iterable, Mapping
from typing import Any

from xml_pipeline.contract import password_hash

from .desired.naming import (CREDENTIALS_DIGEST_ANNOTATION, NEXT_PASSWORD_KEY, PASSWORD_KEY,
                             PREVIOUS_PASSWORD_HASHES_KEY, SIGNING_KEY_KEY)

#: Set (to any new value) on an Organism to request a new shared-Redis password.
ROTATE_ANNOTATION = "xml-pipeline.dev/rotate-credentials"
#: Pod-template annotation: HMAC of the password the pods read; a change rolls them.
DIGEST_ANNOTATION = CREDENTIALS_DIGEST_ANNOTATION
#: Secret keys used while a rotation runs (pods reference only `redis-password`).
NEXT_KEY = NEXT_PASSWORD_KEY
PREVIOUS_KEY = PREVIOUS_PASSWORD_HASHES_KEY
#: After this long waiting for the pods, the status says the rollout is stuck (both passwords stay).
ROLLOUT_TIMEOUT_SECONDS = 3600.0


class Phase(enum.Enum):
    IDLE = "Idle"
    #: A new password is (being) generated and Redis told to accept it beside the old one.
    ACCEPTING = "Accepting"
    #: The Secret holds the new password; Redis accepts both; the pods are rolling.
    ROLLING_OUT = "RollingOut"


class Step(enum.Enum):
    """What the reconciler does next. Every step is idempotent and safe to repeat after a crash."""

    IDLE = "idle"
    START = "start"            # record the request in status.credentials (phase Accepting)
    GENERATE = "generate"      # write redis-password-next into the Secret
    ACCEPT = "accept"          # make Redis accept every password the Secret names
    PUBLISH = "publish"        # swap the Secret's password (Redis accepts the new one already)
    WAIT_FOR_PODS = "wait-for-pods"
    STALLED = "stalled"        # waited longer than the timeout: keep both passwords, say so
    RETIRE = "retire"          # Redis forgets the old password, then the Secret its digest


def phase_of(recorded: str | None, secret: Mapping[str, str]) -> Phase:
    """Where a rotation stands. The Secret (written before Redis changes) wins over the status (written
    at the end of a pass), so a restart anywhere in between resumes at the right step."""
    if secret.get(PREVIOUS_KEY):
        return Phase.ROLLING_OUT
    if secret.get(NEXT_KEY) or recorded == Phase.ACCEPTING.value:
        return Phase.ACCEPTING
    return Phase.IDLE


def request_pending(annotations: Mapping[str, Any] | None, handled: str | None) -> bool:
    value = (annotations or {}).get(ROTATE_ANNOTATION)
    return bool(value) and str(value) != (handled or "")


def next_step(*, phase: Phase, request: bool, secret: Mapping[str, str], redis_accepts_all: bool,
              rolled: bool | None, waited: float, timeout: float = ROLLOUT_TIMEOUT_SECONDS) -> Step:
    """Pure: the next step of a rotation.

    `redis_accepts_all`: Redis was just told to accept every password the Secret names (and said yes).
    `rolled`: every pump/worker Deployment reports the current credentials digest rolled out (None
    while unknown, i.e. before the workloads were applied in this pass). `waited`: seconds in
    RollingOut.
    """
    if phase is Phase.IDLE:
        return Step.START if request else Step.IDLE
    if phase is Phase.ACCEPTING:
        if not secret.get(NEXT_KEY):
            return Step.GENERATE
        return Step.PUBLISH if redis_accepts_all else Step.ACCEPT
    if not redis_accepts_all:
        return Step.ACCEPT  # e.g. Redis restarted without its users: both passwords first
    if rolled is None or not rolled:
        return Step.STALLED if rolled is not None and waited >= timeout else Step.WAIT_FOR_PODS
    return Step.RETIRE


# -- the Secret ------------------------------------------------------------------------------------

def previous_hashes(secret: Mapping[str, str]) -> frozenset[str]:
    """The SHA-256 digests of passwords that must stay accepted until the pods rolled."""
    out = set()
    for h in (secret.get(PREVIOUS_KEY) or "").split(","):
        h = h.strip().lower()
        if len(h) == 64 and all(c in "0123456789abcdef" for c in h):
            out.add(h)
    return frozenset(out)


def format_hashes(hashes: Iterable[str]) -> str:
    return ",".join(sorted(set(hashes)))


def accepted_besides_password(secret: Mapping[str, str]) -> frozenset[str]:
    """What Redis must accept besides `redis-password`: the next password, the previous ones."""
    extra = set(previous_hashes(secret))
    if secret.get(NEXT_KEY):
        extra.add(password_hash(secret[NEXT_KEY]))
    extra.discard(password_hash(secret.get(PASSWORD_KEY, "")))
    return frozenset(extra)


def publish_patch(secret: Mapping[str, str]) -> dict[str, str | None]:
    """The one Secret change that hands the new password to the pods and remembers the old one."""
    new, old = secret[NEXT_KEY], secret.get(PASSWORD_KEY, "")
    previous = set(previous_hashes(secret))
    if old:
        previous.add(password_hash(old))
    previous.discard(password_hash(new))
    return {PASSWORD_KEY: new, NEXT_KEY: None, PREVIOUS_KEY: format_hashes(previous) or None}


def adopt_patch(secret: Mapping[str, str], still_accepted: Iterable[str]) -> dict[str, str | None]:
    """After a hand edit of `redis-password`: record the passwords Redis still accepts, so they stay
    accepted (also across a restart) until the pods rolled."""
    keep = set(previous_hashes(secret)) | set(still_accepted)
    keep.discard(password_hash(secret.get(PASSWORD_KEY, "")))
    return {PREVIOUS_KEY: format_hashes(keep) or None}


def credentials_digest(secret: Mapping[str, str]) -> str | None:
    """The pod-template annotation: HMAC-SHA256 of the password, keyed with the signing key (both
    secret, both in the Secret), so the annotation changes with the password and reveals nothing
    about it. None without a signing key (an unkeyed hash would be a password oracle)."""
    key, password = secret.get(SIGNING_KEY_KEY, ""), secret.get(PASSWORD_KEY, "")
    if not key or not password:
        return None
    return hmac.new(key.encode("utf-8"), b"redis-password\x00" + password.encode("utf-8"),
                    hashlib.sha256).hexdigest()[:32]


# -- the Deployments -------------------------------------------------------------------------------

def rollout_complete(body: Mapping[str, Any] | None, digest: str) -> bool:
    """Every pod of this Deployment runs the template with `digest`, and none of the old ones is left
    (what `kubectl rollout status` waits for, plus the template check)."""
    if not body:
        return False
    meta, spec, st = body.get("metadata") or {}, body.get("spec") or {}, body.get("status") or {}
    template = ((spec.get("template") or {}).get("metadata") or {}).get("annotations") or {}
    if template.get(DIGEST_ANNOTATION) != digest:
        return False
    generation, observed = meta.get("generation"), st.get("observedGeneration")
    if generation is None or observed is None or int(observed) < int(generation):
        return False
    want = int(spec.get("replicas", 1))
    updated = int(st.get("updatedReplicas") or 0)
    return (updated >= want and int(st.get("availableReplicas") or 0) >= want
            and int(st.get("replicas") or 0) <= updated)
