"""What the tenancy code reads from Organism objects as the API returns them (pure functions):
which shared-Redis tenant an Organism is, whether its prefix is admissible at all, its deletion
policy, and which usage figures are worth a status write.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from xml_pipeline.errors import ConfigError
from xml_pipeline.memory.keys import validate_prefix

from ..model import default_prefix, reserved_prefix_problem
from . import overlap
from .usage import Usage


def tenant_from_body(namespace: str, name: str, body: Mapping[str, Any]) -> overlap.Tenant | None:
    """The shared-Redis tenant an Organism object describes, or None if it does not use shared mode."""
    spec = body.get("spec") or {}
    backend = spec.get("backend") or {}
    r = backend.get("redis") or {}
    if not isinstance(r, Mapping) or backend.get("type", "redis") != "redis" or r.get("mode") != "shared":
        return None
    status_prefix = ((body.get("status") or {}).get("redis") or {}).get("prefix")
    prefix = r.get("prefix") or status_prefix or default_prefix(namespace, name)
    created = str((body.get("metadata") or {}).get("creationTimestamp") or "")
    return overlap.Tenant(namespace, name, str(prefix), created=created)


def admissible(tenant: overlap.Tenant) -> bool:
    """False for a prefix the operator refuses whatever else exists (invalid, or reserved for other
    Organisms' default prefixes): such an Organism must not block anyone in the overlap check."""
    try:
        validate_prefix(tenant.prefix, "spec.backend.redis.prefix")
    except ConfigError:
        return False
    return reserved_prefix_problem(tenant.prefix, tenant.namespace, tenant.name) is None


def deletion_policy(body: Mapping[str, Any]) -> str:
    """spec.backend.redis.deletionPolicy: Delete (default) or Retain."""
    r = ((body.get("spec") or {}).get("backend") or {}).get("redis") or {}
    policy = r.get("deletionPolicy", "Delete") if isinstance(r, Mapping) else "Delete"
    return "Retain" if policy == "Retain" else "Delete"


def usage_patch(current: Mapping[str, Any] | None, usage: Usage) -> dict[str, Any] | None:
    """The status.usage to write, or None when the change is not worth a write (idle organisms are
    not rewritten every round: same threads and keys, bytes within 10 %)."""
    new = usage.as_status()
    if current:
        same_counts = current.get("threads") == new["threads"] and current.get("keys") == new["keys"]
        old_bytes = int(current.get("approxBytes") or 0)
        close = abs(int(new["approxBytes"]) - old_bytes) <= 0.1 * max(old_bytes, 1)
        if same_counts and close:
            return None
    return new
