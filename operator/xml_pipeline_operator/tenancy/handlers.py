"""kopf registrations for shared-Redis tenancy (added by handlers.register when the admin is real).

- an index over all Organisms: feeds SharedRedisAdmin.observe, so the prefix-overlap check knows
  every shared Organism before any handler runs (kopf fills indexes before invoking handlers);
- a timer on shared-mode Organisms: drives the admin's periodic work (usage tick, lost-user check;
  rate-limited inside the admin, so N Organisms do not mean N ticks) and writes `status.usage` when
  it changed enough to be worth a write.
"""
from __future__ import annotations

from typing import Any

import kopf

from .. import GROUP, PLURAL, VERSION
from ..handlers import namespaced
from .admin import SharedRedisAdmin
from .bodies import tenant_from_body, usage_patch


def register_tenancy(registry: kopf.OperatorRegistry, admin: object) -> None:
    """Register the tenancy handlers if `admin` administers a shared Redis; otherwise nothing."""
    if not isinstance(admin, SharedRedisAdmin):
        return

    @kopf.index(GROUP, VERSION, PLURAL, registry=registry)
    def shared_tenants(namespace: str | None, name: str, body: kopf.Body, **_: Any) -> str | None:
        namespace = namespaced(namespace)
        admin.observe(namespace, name, body)
        tenant = tenant_from_body(namespace, name, body)
        return tenant.prefix if tenant is not None else None

    def is_shared(body: kopf.Body, **_: Any) -> bool:
        return tenant_from_body(str(body.metadata.namespace), str(body.metadata.name), body) is not None

    @kopf.timer(GROUP, VERSION, PLURAL, registry=registry, interval=admin.timer_seconds, idle=None,
                when=is_shared)
    def shared_usage(namespace: str | None, name: str, status: kopf.Status, patch: kopf.Patch, **_: Any) -> None:
        namespace = namespaced(namespace)
        admin.periodic()
        usage = admin.usage_of(namespace, name)
        if usage is None:
            return
        change = usage_patch(status.get("usage"), usage)
        if change is not None:
            patch.status["usage"] = change
