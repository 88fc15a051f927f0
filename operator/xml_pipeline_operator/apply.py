"""Compare desired objects with the cluster and write only the differences.

The comparison is "desired is contained in actual": fields the API server adds (defaults, status,
resourceVersion, clusterIP...) are not differences. Lists are compared element by element and,
when they differ, patched whole (JSON merge patch semantics, the same on a real API server and on
kmock). Resource quantities compare by value ("0.5" == "500m"). An unchanged object costs one GET
and no write, which is what makes an idle resync write nothing.

A desired value of None means "must be absent": it becomes a null in the patch only when the live
object has a non-empty value there (the API server leaves empty fields out, so comparing [] with a
missing field would write on every pass). So a field the operator owns is reverted when edited by
hand (added env, an added toleration), and a field it does not set is left alone (an annotation
added by another controller). `create_only` paths (the worker replicas while an autoscaler owns
them) seed a new object and are never compared or patched afterwards.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from .desired import binding as binding_mod
from .desired import credentials as creds
from .desired.tls import CA_KEY
from .kube import Conflict, Kube
from .model import Organism

Action = Literal["created", "patched", "unchanged", "deleted"]
_QUANTITY_KEYS = ("requests", "limits")


class NameConflict(Exception):
    """An object with the name the Organism needs exists but belongs to someone else."""

    def __init__(self, kind: str, name: str) -> None:
        self.kind, self.name = kind, name
        super().__init__(f"{kind} {name!r} already exists and is not owned by this Organism; "
                         "rename or remove it (the operator never takes over foreign objects)")


@dataclass
class Outcome:
    kind: str
    name: str
    action: Action
    body: dict[str, Any] | None = None
    changed: list[str] = field(default_factory=list)  # top-level paths that differed (for events)


# ------------------------------------------------------------------------------------------- diffing
def diff(desired: Any, actual: Any, path: tuple[str, ...] = ()) -> Any:
    """A JSON merge patch turning `actual` into something containing `desired`, or None if it already does."""
    if isinstance(desired, Mapping):
        if not isinstance(actual, Mapping):
            return desired
        patch: dict[str, Any] = {}
        for key, want in desired.items():
            if want is None or (isinstance(want, (list, dict)) and not want):
                if _empty(actual.get(key)):
                    continue  # absent, or empty, as wanted
                if want is None:
                    patch[key] = None
                    continue
            if key not in actual:
                patch[key] = want
                continue
            sub = diff(want, actual[key], path + (key,))
            if sub is not None:
                patch[key] = sub
        return patch or None
    if isinstance(desired, list):
        if not isinstance(actual, list) or len(desired) != len(actual):
            return prune(desired)
        if any(diff(d, a, path) is not None for d, a in zip(desired, actual)):
            return prune(desired)
        return None
    return None if _same_scalar(desired, actual, path) else desired


def _empty(value: Any) -> bool:
    return value is None or (isinstance(value, (list, dict, str)) and not value)


def prune(value: Any) -> Any:
    """`value` without its None entries (what a create sends: "absent" is simply left out)."""
    if isinstance(value, Mapping):
        return {k: prune(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [prune(v) for v in value]
    return value


def _same_scalar(desired: Any, actual: Any, path: tuple[str, ...]) -> bool:
    if desired == actual and type(desired) is type(actual):
        return True
    if any(k in path for k in _QUANTITY_KEYS) and isinstance(desired, (str, int)) and isinstance(actual, (str, int)):
        from kubernetes.utils.quantity import parse_quantity
        try:
            return bool(parse_quantity(desired) == parse_quantity(actual))
        except ValueError:
            return False
    return False


def owned_by(obj: Mapping[str, Any], uid: str) -> bool:
    return any(ref.get("uid") == uid for ref in obj.get("metadata", {}).get("ownerReferences") or [])


def _comparable(desired: Mapping[str, Any], create_only: tuple[tuple[str, ...], ...] = ()) -> dict[str, Any]:
    """What to compare: the spec/data and our labels/annotations, not identity or ownership."""
    out = {k: v for k, v in desired.items() if k not in ("apiVersion", "kind", "metadata")}
    for path in create_only:
        out = _without(out, path)
    meta = desired.get("metadata", {})
    out["metadata"] = {k: meta[k] for k in ("labels", "annotations") if k in meta}
    return out


def _without(obj: Mapping[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    out = dict(obj)
    if len(path) == 1:
        out.pop(path[0], None)
    elif isinstance(out.get(path[0]), Mapping):
        out[path[0]] = _without(out[path[0]], path[1:])
    return out


# ------------------------------------------------------------------------------------------ applying
def apply_object(kube: Kube, desired: dict[str, Any], owner_uid: str,
                 create_only: tuple[tuple[str, ...], ...] = ()) -> Outcome:
    """Create the object, or patch the fields that differ. Never takes over a foreign object."""
    kind, meta = desired["kind"], desired["metadata"]
    name, namespace = meta["name"], meta["namespace"]
    created, current = _create_or_own(kube, kind, namespace, name, owner_uid, lambda: prune(desired))
    if created is not None:
        return Outcome(kind, name, "created", created)
    patch = diff(_comparable(desired, create_only), current)
    if patch is None:
        return Outcome(kind, name, "unchanged", current)
    return Outcome(kind, name, "patched", kube.patch(kind, namespace, name, patch), changed=_paths(patch))


def _create_or_own(kube: Kube, kind: str, namespace: str, name: str, owner_uid: str,
                   body: Callable[[], dict[str, Any]]) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """(the object this call created, {}) when it did not exist, else (None, the existing object),
    which must be owned by `owner_uid` (NameConflict otherwise: never take over a foreign object).
    Created meanwhile (an earlier run of ours, interrupted): the existing one is returned."""
    current = kube.get(kind, namespace, name)
    if current is None:
        try:
            return kube.create(kind, namespace, body()), {}
        except Conflict:
            current = kube.get(kind, namespace, name)
            if current is None:
                raise
    if not owned_by(current, owner_uid):
        raise NameConflict(kind, name)
    return None, current


def delete_if_owned(kube: Kube, kind: str, namespace: str, name: str, owner_uid: str) -> Outcome | None:
    """Delete a leftover of this Organism (e.g. the worker Deployment after a switch to memory)."""
    current = kube.get(kind, namespace, name)
    if current is None or not owned_by(current, owner_uid):
        return None  # absent, or someone else's: not ours to delete
    kube.delete(kind, namespace, name, uid=current["metadata"].get("uid"))
    return Outcome(kind, name, "deleted")


def ensure_credentials(kube: Kube, org: Organism, ca: str | None = None) -> tuple[Outcome, dict[str, str]]:
    """The <name>-credentials Secret: created once with fresh values, afterwards only completed.
    `ca`: the shared Redis's CA certificate, kept under `ca.crt` (desired/tls.py; removed when None).

    Returns the outcome and the decoded values (kept in memory only, for the shared-Redis seam).
    """
    desired_values = creds.generate(org) | ({CA_KEY: ca} if ca else {})
    desired = creds.credentials_secret(org, desired_values)
    name = desired["metadata"]["name"]
    created, current = _create_or_own(kube, "Secret", org.namespace, name, org.uid, lambda: desired)
    if created is not None:
        return Outcome("Secret", name, "created", created), desired_values
    values = creds.decode(current.get("data"))
    changes: dict[str, str | None] = dict(creds.completion(org, values, desired_values))
    if values.get(CA_KEY) != ca:
        changes[CA_KEY] = ca or None
    _update(values, changes)
    return _complete_secret(kube, org, current, desired, changes), values


def _update(values: dict[str, str], changes: Mapping[str, str | None]) -> None:
    for k, v in changes.items():
        if v is None:
            values.pop(k, None)
        else:
            values[k] = v


def ensure_binding(kube: Kube, org: Organism, endpoint: str, credentials: Mapping[str, str]) -> tuple[Outcome, dict[str, str]]:
    """The <name>-binding Secret (desired/binding.py): created with a fresh client password, afterwards
    kept in line with the Organism (prefix, TTL, endpoint, signing key); the password is never replaced.

    Returns the outcome and the decoded values (kept in memory only, for the shared-Redis seam).
    """
    name = binding_mod.binding_name(org.name)
    fresh = binding_mod.binding_values(org, endpoint, credentials, binding_mod.generate_password())
    created, current = _create_or_own(kube, "Secret", org.namespace, name, org.uid,
                                      lambda: binding_mod.binding_secret(org, fresh))
    if created is not None:
        return Outcome("Secret", name, "created", created), fresh
    values = creds.decode(current.get("data"))
    password = values.get(binding_mod.PASSWORD_KEY) or binding_mod.generate_password()
    wanted = binding_mod.binding_values(org, endpoint, credentials, password)
    changes: dict[str, str | None] = {k: v for k, v in wanted.items() if values.get(k) != v}
    if CA_KEY in values and CA_KEY not in wanted:  # the Redis no longer has a private CA
        changes[CA_KEY] = None
    _update(values, changes)
    return _complete_secret(kube, org, current, binding_mod.binding_secret(org, wanted), changes), values


def _complete_secret(kube: Kube, org: Organism, current: dict[str, Any], desired: Mapping[str, Any],
                     changes: Mapping[str, str | None]) -> Outcome:
    """Patch `changes` (decoded values; None removes a key) and the desired labels into the Secret
    `current`, if any."""
    name = current["metadata"]["name"]
    patch: dict[str, Any] = {}
    if changes:
        patch["data"] = {k: None if v is None else creds.encode({k: v})[k] for k, v in changes.items()}
    label_patch = diff({"labels": desired["metadata"]["labels"]}, current.get("metadata", {}))
    if label_patch:
        patch["metadata"] = label_patch
    if not patch:
        return Outcome("Secret", name, "unchanged", current)
    # The changed key names (never values) go into the outcome, for the event.
    return Outcome("Secret", name, "patched", kube.patch("Secret", org.namespace, name, patch),
                   changed=[f"data.{k}" for k in sorted(changes)] + (["metadata.labels"] if label_patch else []))


def _paths(patch: Mapping[str, Any], prefix: str = "", depth: int = 3) -> list[str]:
    out: list[str] = []
    for key, value in patch.items():
        path = f"{prefix}.{key}" if prefix else key
        if isinstance(value, Mapping) and depth > 1:
            out += _paths(value, path, depth - 1)
        else:
            out.append(path)
    return out
