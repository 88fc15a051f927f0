"""The seam for shared-mode Redis: one ACL user per Organism on the platform's shared Redis.

Shared mode renders like the other modes (the pods reach XPO_SHARED_REDIS_URL with the Organism's own
user name and password from its `<name>-credentials` Secret); the ACL user itself, allowed only the
Organism's key prefix, is created by `tenancy.admin.SharedRedisAdmin`. Without a shared Redis in the
operator's settings there is nothing to provision on, and the RedisReady condition says so.
"""
from __future__ import annotations

from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Protocol

from xml_pipeline.contract import Tenant as Tenant
from xml_pipeline.contract import acl_username as acl_username

from .settings import OperatorSettings


@dataclass(frozen=True)
class TenantState:
    """Outcome of ensure_tenant, reported as the RedisReady condition."""

    ready: bool
    reason: str
    message: str
    #: Reason "PasswordChanged": the user exists but does not know the Secret's password (edited by
    #: hand); these are the SHA-256 digests it accepts instead. Nothing was written: record them
    #: (rotation.adopt_patch) and call again with them in `also_accept_hashes`.
    still_accepted: frozenset[str] = field(default=frozenset(), repr=False)
    #: Nodes of a cluster or Sentinel set that had lost the user and got it back in this call.
    repaired: tuple[str, ...] = ()


PASSWORD_CHANGED = "PasswordChanged"


class RedisAdmin(Protocol):
    def ensure_tenant(self, tenant: Tenant, password: str, also_accept_hashes: AbstractSet[str] = frozenset()) -> TenantState:
        """Create or update the tenant's ACL user (idempotent) to accept exactly `password` and the
        SHA-256 digests in `also_accept_hashes` (a rotation in progress). If the user exists, does not
        know `password` and accepts others (the Secret was edited by hand), write nothing and answer
        PASSWORD_CHANGED with those in `still_accepted`. Must never log the password."""

    def release_tenant(self, tenant: Tenant) -> None:
        """Remove the tenant's ACL user (and, by policy, its keys) when the Organism is deleted."""

    def ensure_client(self, tenant: Tenant, username: str, password: str,
                      also_accept_hashes: AbstractSet[str] = frozenset()) -> TenantState:
        """Create or update the tenant's *client* ACL user (tenancy.client_acl: send to ingress, read
        egress and the context, nothing else). Call only after ensure_tenant answered ready."""


class NoSharedRedisAdmin:
    """Used when the operator has no shared Redis configured: provisions nothing and says why."""

    def __init__(self, settings: OperatorSettings) -> None:
        self.settings = settings

    def ensure_tenant(self, tenant: Tenant, password: str, also_accept_hashes: AbstractSet[str] = frozenset()) -> TenantState:
        del password, also_accept_hashes
        return TenantState(
            ready=False, reason="SharedRedisNotConfigured",
            message=f"ACL user {tenant.username!r} for prefix {tenant.prefix!r} cannot be provisioned: the "
                    "operator has no shared Redis (set sharedRedis in the chart values, i.e. XPO_SHARED_REDIS_URL)")

    def release_tenant(self, tenant: Tenant) -> None:
        del tenant

    def ensure_client(self, tenant: Tenant, username: str, password: str,
                      also_accept_hashes: AbstractSet[str] = frozenset()) -> TenantState:
        del password, also_accept_hashes
        return TenantState(False, "SharedRedisNotConfigured",
                           f"client ACL user {username!r} of {tenant.namespace}/{tenant.name} cannot be provisioned: "
                           "the operator has no shared Redis")


def make_admin(settings: OperatorSettings) -> RedisAdmin:
    """The real admin (tenancy.admin.SharedRedisAdmin) when a shared Redis is configured."""
    if not settings.shared_redis_url:
        return NoSharedRedisAdmin(settings)
    from .tenancy.admin import SharedRedisAdmin  # imports redis-py only when shared mode is configured
    return SharedRedisAdmin(settings)
