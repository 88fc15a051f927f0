"""SharedRedisAdmin: the operator's real `RedisAdmin` for `backend.redis.mode: shared`.

It ties the pure pieces of this package to the operator's seam (redis_admin.py):

- `observe()` is fed by a kopf index with every Organism (kopf fills its indexes before any handler
  runs), so the overlap check sees all shared Organisms, also right after an operator restart;
- `ensure_tenant()` refuses an overlapping prefix (naming the Organism that holds it) or makes the
  ACL user exist exactly as desired, and remembers the desired state for recovery;
- `release_tenant()` runs the deletion policy: Delete disables the user (closing its connections, so
  nothing writes any more), removes the keys in resumable batches, then deletes the user; Retain
  only disables the user;
- `periodic()` (called from a per-Organism kopf timer, rate-limited to once per interval for the
  whole operator) advances the usage sampler and re-creates users the server has lost.

Passwords are never logged and never put in messages.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from collections.abc import Set as AbstractSet
from typing import Any

import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from xml_pipeline.memory.config import redact_url

from xml_pipeline.errors import ConfigError
from xml_pipeline.memory.keys import validate_prefix

from ..model import default_prefix, reserved_prefix_problem
from ..redis_admin import PASSWORD_CHANGED, Tenant, TenantState
from ..settings import OperatorSettings
from . import acl, client_acl, functions, overlap, ownership
from .cleanup import CleanupProgress, cleanup_prefix
from .recovery import DesiredUser, UserRecovery
from .usage import Usage, UsageSampler

logger = logging.getLogger(__name__)

#: Seconds between usage ticks and between lost-user checks (for the whole operator).
USAGE_INTERVAL_SECONDS = 30.0
USER_CHECK_INTERVAL_SECONDS = 30.0
#: How long one release_tenant call may spend deleting keys before it hands back (and is retried).
CLEANUP_BUDGET_SECONDS = 10.0
#: After a failed connection, answer from the failure for this long instead of connecting again
#: (a reconcile of every Organism must not wait for a dead Redis each time).
UNAVAILABLE_HOLD_SECONDS = 5.0
#: Cleanup progress lives in the shared Redis under a key no tenant can match: prefixes start with
#: [A-Za-z0-9_.-], this key starts with '{'.
PROGRESS_KEY = "{xp-operator}:cleanup:"
PROGRESS_TTL_SECONDS = 7 * 86400


class CleanupInProgress(Exception):
    """release_tenant deleted a bounded share of the keys; call it again to continue."""

    def __init__(self, progress: CleanupProgress) -> None:
        self.progress = progress
        super().__init__(f"deleted {progress.deleted} keys under {progress.prefix!r} so far; continuing")


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


class SharedRedisAdmin:
    """Administers organism users on one shared Redis. Thread-safe (kopf runs handlers in threads)."""

    def __init__(self, settings: OperatorSettings, *, client: redis.Redis | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 usage_interval: float = USAGE_INTERVAL_SECONDS,
                 user_check_interval: float = USER_CHECK_INTERVAL_SECONDS,
                 cleanup_budget: float = CLEANUP_BUDGET_SECONDS, cleanup_batch: int = 1000) -> None:
        if not settings.shared_redis_url:
            raise ValueError("SharedRedisAdmin needs settings.shared_redis_url (XPO_SHARED_REDIS_URL)")
        self.settings = settings
        self.url = redact_url(settings.shared_redis_url)
        self._client_obj = client
        self._clock = clock
        self.usage_interval = usage_interval
        self.user_check_interval = user_check_interval
        self.cleanup_budget = cleanup_budget
        self.cleanup_batch = cleanup_batch
        #: Interval of the per-Organism kopf timer that publishes usage and drives periodic().
        self.timer_seconds = min(usage_interval, user_check_interval)
        self._lock = threading.Lock()
        self._periodic_lock = threading.Lock()
        self._observed: dict[tuple[str, str], overlap.Tenant] = {}
        self._policies: dict[tuple[str, str], str] = {}
        #: Organisms seen in another mode: a user of theirs on this Redis is an orphan to disable.
        self._not_shared: set[tuple[str, str]] = set()
        self._desired: dict[tuple[str, str], DesiredUser] = {}
        self._failed: tuple[float, TenantState] | None = None
        self._recovery: UserRecovery | None = None
        self._sampler: UsageSampler | None = None
        self._last_usage = float("-inf")
        self._last_check = float("-inf")
        #: The function library tenants FCALL was found or loaded (cleared when a check misses it).
        self._functions_ready = False
        #: (server commands, their ACL wording) of the client users' rules (client_acl.py).
        self._client_words: tuple[frozenset[str], frozenset[str]] | None = None

    # -- connection --------------------------------------------------------------------------------
    def client(self) -> redis.Redis:
        if self._client_obj is None:
            s = self.settings
            self._client_obj = redis.Redis.from_url(
                s.shared_redis_url or "", username=s.shared_redis_username or None,
                password=s.shared_redis_password, socket_connect_timeout=2.0, socket_timeout=10.0,
                health_check_interval=30, client_name="xml-pipeline-operator",
                retry=Retry(ExponentialWithJitterBackoff(cap=0.5, base=0.05), 2),
                **({"ssl_ca_data": s.shared_redis_ca} if s.shared_redis_ca else {}))
        return self._client_obj

    def recovery(self) -> UserRecovery:
        if self._recovery is None:
            self._recovery = UserRecovery(self.client())
        return self._recovery

    def _unavailable(self, e: Exception, what: str) -> TenantState:
        if isinstance(e, redis.AuthenticationError):
            state = TenantState(False, "SharedRedisAuthFailed",
                                f"the shared Redis at {self.url} refused the operator's credentials "
                                f"(XPO_SHARED_REDIS_USERNAME/PASSWORD) while {what}")
        elif isinstance(e, (redis.ConnectionError, redis.TimeoutError)):
            state = TenantState(False, "SharedRedisUnavailable",
                                f"the shared Redis at {self.url} is unreachable while {what}: {type(e).__name__}")
        else:
            state = TenantState(False, "SharedRedisError",
                                f"the shared Redis at {self.url} refused {what}: {str(e)[:300]}")
        if state.reason != "SharedRedisError":
            self._failed = (self._clock(), state)
        return state

    def _recent_failure(self) -> TenantState | None:
        if self._failed is not None and self._clock() - self._failed[0] < UNAVAILABLE_HOLD_SECONDS:
            return self._failed[1]
        return None

    # -- what exists -------------------------------------------------------------------------------
    def observe(self, namespace: str, name: str, body: Mapping[str, Any]) -> None:
        """Record the Organism (kopf index handler): shared ones take part in the overlap check."""
        t = tenant_from_body(namespace, name, body)
        key = (namespace, name)
        meta = body.get("metadata") or {}
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            # The last event of a deleted Organism (its finalizer ran): it no longer holds its prefix
            # here; what stays owned is recorded on the shared Redis (ownership.py).
            with self._lock:
                self._observed.pop(key, None)
                self._policies.pop(key, None)
            return
        with self._lock:
            was_admitted = key in self._desired
            if t is None:
                self._observed.pop(key, None)
                self._policies.pop(key, None)
                self._desired.pop(key, None)
                self._not_shared.add(key)
            else:
                if admissible(t):
                    self._observed[key] = t
                else:
                    self._observed.pop(key, None)
                    self._desired.pop(key, None)  # never reloaded by recovery
                self._policies[key] = deletion_policy(body)
                self._not_shared.discard(key)
        if t is not None and not admissible(t) and was_admitted:
            # Admitted before the prefix rules refused its prefix (e.g. another Organism's default
            # prefix): it must not keep reading keys that may be another's.
            try:
                acl.disable_user(self.client(), acl.username_for(namespace, name))
                logger.warning("Organism %s/%s has a prefix the operator refuses now: ACL user disabled",
                               namespace, name)
            except redis.RedisError as e:
                logger.warning("could not disable the ACL user of %s/%s on %s: %s", namespace, name, self.url,
                               type(e).__name__)
        if t is None and was_admitted:
            # Switched away from shared mode: the pods no longer use this Redis, so its user must
            # not keep working (the Secret's password now serves the new mode). Keys stay and expire
            # with their TTL; switching back re-enables the user.
            try:
                acl.disable_user(self.client(), acl.username_for(namespace, name))
                logger.info("Organism %s/%s left shared mode: ACL user disabled", namespace, name)
            except redis.RedisError as e:
                logger.warning("could not disable the ACL user of %s/%s on %s: %s", namespace, name, self.url,
                               type(e).__name__)

    def conflict_of(self, namespace: str, name: str, prefix: str) -> overlap.Tenant | None:
        with self._lock:
            known = self._observed.get((namespace, name))
            # Not observed yet (a direct call): treat it as the newest, so it never displaces anyone.
            created = known.created if known is not None else "\uffff"
            candidate = overlap.Tenant(namespace, name, prefix, created=created)
            return overlap.find_conflict(candidate, list(self._observed.values()))

    # -- RedisAdmin --------------------------------------------------------------------------------
    def ensure_tenant(self, tenant: Tenant, password: str,
                      also_accept_hashes: AbstractSet[str] = frozenset()) -> TenantState:
        key = (tenant.namespace, tenant.name)
        if not password or not tenant.username:
            return TenantState(False, "SharedRedisCredentialsMissing",
                               f"the Secret {tenant.name}-credentials has no redis-username/redis-password yet")
        conflict = self.conflict_of(tenant.namespace, tenant.name, tenant.prefix)
        if conflict is not None:
            with self._lock:
                self._desired.pop(key, None)
            candidate = overlap.Tenant(tenant.namespace, tenant.name, tenant.prefix)
            if self._recent_failure() is None:
                try:  # a user made before the conflict was known must not keep the other's keys
                    acl.disable_user(self.client(), tenant.username)
                except redis.RedisError as e:
                    self._unavailable(e, f"disabling ACL user {tenant.username!r}")
            return TenantState(False, "PrefixOverlap", overlap.conflict_message(candidate, conflict))
        reserved = reserved_prefix_problem(tenant.prefix, tenant.namespace, tenant.name)
        if reserved is not None:
            return TenantState(False, "PrefixReserved", f"{ownership.FIELD}: {reserved}")
        failed = self._recent_failure()
        if failed is not None:
            return failed
        try:
            client = self.client()
            me = ownership.Owner(tenant.namespace, tenant.name, tenant.uid)
            held = ownership.owner_of(client, tenant.prefix)
            refusal = ownership.claim(client, tenant.prefix, me)
            if refusal is None and held is not None and held.same_organism(me) and held.uid and tenant.uid \
                    and held.uid != tenant.uid:
                # Re-created under its old name: it takes the retained data back, with a new user (the
                # old one, disabled at deletion, knows only the deleted Organism's passwords).
                acl.delete_user(client, tenant.username)
                logger.info("Organism %s/%s (uid %s) takes back prefix %s retained from uid %s", tenant.namespace,
                            tenant.name, tenant.uid, tenant.prefix, held.uid)
            if refusal is not None:
                with self._lock:
                    self._desired.pop(key, None)
                acl.disable_user(client, tenant.username)  # a user made earlier must not keep the keys
                return TenantState(False, refusal.reason, refusal.message)
            if not self._functions_ready:
                self._ensure_functions(client)
            profile = self.recovery().current_profile()
            extra = frozenset(also_accept_hashes)
            user = acl.get_user(client, tenant.username)
            if user is not None:
                unknown = user.password_hashes - extra - {acl.password_hash(password)}
                if acl.password_hash(password) not in user.password_hashes and unknown:
                    # The Secret's password was changed behind the operator's back. Removing the
                    # passwords Redis knows would lock out every running pod: the caller records
                    # them durably first (rotation.adopt_patch) and calls again.
                    return TenantState(False, PASSWORD_CHANGED,
                                       f"the Secret {tenant.name}-credentials holds a password ACL user "
                                       f"{tenant.username!r} does not know yet", still_accepted=unknown)
            change = acl.ensure_user(client, tenant.username, password, tenant.prefix,
                                     also_accept_hashes=extra, profile=profile)
        except functions.FunctionsUnsupported as e:
            return TenantState(False, "SharedRedisTooOld", f"{e}; shared mode needs a newer shared Redis")
        except redis.RedisError as e:
            return self._unavailable(e, f"provisioning ACL user {tenant.username!r}")
        self._failed = None
        with self._lock:
            self._desired[key] = DesiredUser(tenant.username, tenant.prefix, password, also_accept_hashes=extra)
        if change is not acl.Change.UNCHANGED:
            logger.info("ACL user %s %s on %s (prefix %s)", tenant.username, change.value, self.url, tenant.prefix)
            self._save_acl()
        message = (f"ACL user {tenant.username!r} may use keys and channels under {tenant.prefix!r} only, "
                   f"on {self.url}")
        if extra:
            message += f"; {len(extra)} other password(s) accepted while a password rotation runs"
        return TenantState(True, "AclUserReady", message)

    def ensure_client(self, tenant: Tenant, username: str, password: str,
                      also_accept_hashes: AbstractSet[str] = frozenset()) -> TenantState:
        """The organism's client user (client_acl.py); the organism's own user must be ready first."""
        if not password:
            return TenantState(False, "ClientCredentialsMissing",
                               f"the Secret {tenant.name}-binding has no password yet")
        failed = self._recent_failure()
        if failed is not None:
            return failed
        try:
            client = self.client()
            available = self.recovery().current_profile().available
            # How this server words the client's rules: learnt once per server profile (a probe user
            # is an ACL write; an idle pass writes none).
            cached = self._client_words
            if cached is None or cached[0] != available:
                cached = self._client_words = (available, client_acl.described_commands(client, available))
            change = client_acl.ensure_client_user(client, username, password, tenant.prefix,
                                                   also_accept_hashes=frozenset(also_accept_hashes),
                                                   available=available, described=cached[1])
        except redis.RedisError as e:
            return self._unavailable(e, f"provisioning client ACL user {username!r}")
        if change is not acl.Change.UNCHANGED:
            logger.info("client ACL user %s %s on %s (prefix %s)", username, change.value, self.url, tenant.prefix)
            self._save_acl()
        return TenantState(True, "ClientUserReady",
                           f"client ACL user {username!r} may send to {tenant.prefix}ingress and read the "
                           "organism's answers and context")

    def release_tenant(self, tenant: Tenant, policy: str | None = None) -> None:
        """Apply the deletion policy (`policy`, else the Organism's spec.backend.redis.deletionPolicy
        as observed). Raises CleanupInProgress when keys remain: call again to continue."""
        key = (tenant.namespace, tenant.name)
        if policy is None:
            with self._lock:
                policy = self._policies.get(key, "Delete")
        client = self.client()
        # The organism's clients go with it, whatever the policy (Retain keeps data, not access).
        acl.delete_user(client, client_acl.client_username(tenant.namespace, tenant.name))
        conflict = self.conflict_of(tenant.namespace, tenant.name, tenant.prefix) if tenant.prefix else None
        with self._lock:
            admitted = key in self._desired
        me = ownership.Owner(tenant.namespace, tenant.name, tenant.uid)
        holder = ownership.owner_of(client, tenant.prefix) if tenant.prefix else None
        if holder is not None and not holder.same_organism(me):
            conflict = conflict or overlap.Tenant(holder.namespace, holder.name, tenant.prefix)
        owned = admitted or (holder is not None and holder.same_organism(me)) or acl.user_exists(client, tenant.username)
        if conflict is not None or not tenant.prefix or not owned:
            # This Organism never owned its prefix (it was refused, or never got a user): keys there
            # may be another organism's. Only a user of its own name may go.
            acl.delete_user(client, tenant.username)
            self._forget(key)
            return
        if policy == "Retain":
            acl.disable_user(client, tenant.username)
            ownership.mark_retained(client, tenant.prefix, me)  # the data stays its owner's
            self._save_acl()
            self._forget(key)
            logger.info("ACL user %s disabled; keys under %s retained", tenant.username, tenant.prefix)
            return
        # Delete: no new writes first (disabling also closes the user's connections), then the keys.
        acl.disable_user(client, tenant.username)
        progress_key = PROGRESS_KEY + tenant.prefix
        raw = client.get(progress_key)
        start = CleanupProgress.from_dict(json.loads(raw)) if raw else None
        deadline = time.monotonic() + self.cleanup_budget

        def persist(p: CleanupProgress) -> None:
            client.set(progress_key, json.dumps(p.as_dict()), ex=PROGRESS_TTL_SECONDS)

        progress = start or CleanupProgress(prefix=tenant.prefix)
        while not progress.done:  # at least one batch per call, then as many as the budget allows
            progress = cleanup_prefix(client, tenant.prefix, start=progress, batch_size=self.cleanup_batch,
                                      max_batches=1, on_batch=persist)
            if time.monotonic() >= deadline:
                break
        if not progress.done:
            raise CleanupInProgress(progress)
        acl.delete_user(client, tenant.username)
        ownership.release(client, tenant.prefix, me)  # no data left: the prefix is free again
        client.delete(progress_key)
        self._save_acl()
        self._forget(key)
        logger.info("removed %d keys under %s and ACL user %s", progress.deleted, tenant.prefix, tenant.username)

    def _ensure_functions(self, client: redis.Redis) -> None:
        """Make sure the function library tenants FCALL is loaded (FunctionsUnsupported if it cannot be)."""
        state = functions.ensure_library(client)
        if state is functions.LibraryState.LOADED:
            logger.info("function library %s loaded on %s", functions.library().name, self.url)
        self._functions_ready = True

    def _save_acl(self) -> None:
        """Best effort: persist users where the server has an ACL file (else recovery covers restarts)."""
        try:
            acl.save_acl(self.client())
        except redis.RedisError as e:
            logger.debug("ACL SAVE on %s not done: %s", self.url, type(e).__name__)

    def _forget(self, key: tuple[str, str]) -> None:
        with self._lock:
            self._desired.pop(key, None)
            self._observed.pop(key, None)
            self._policies.pop(key, None)
            if self._sampler is not None:
                self._sampler.latest.pop(key, None)

    # -- periodic work -----------------------------------------------------------------------------
    def periodic(self) -> None:
        """Usage tick and lost-user check, each at most once per interval for the whole operator.
        Called by every shared Organism's timer; concurrent callers skip instead of waiting."""
        if not self._periodic_lock.acquire(blocking=False):
            return
        try:
            now = self._clock()
            with self._lock:
                desired = list(self._desired.values())
                tenants = {k: d.prefix for k, d in self._desired.items()}
            if now - self._last_check >= self.user_check_interval:
                self._last_check = now
                try:
                    report = self.recovery().check(desired)
                except (redis.RedisError, functions.FunctionsUnsupported) as e:
                    logger.warning("lost-user check on %s failed: %s", self.url, type(e).__name__)
                else:
                    if report.changed:
                        logger.warning("shared Redis %s %s: re-created %d ACL user(s), repaired %d%s", self.url,
                                       "restarted" if report.restarted else "lost users",
                                       len(report.recreated), len(report.repaired),
                                       ", loaded the function library again" if report.functions_reloaded else "")
                    self._disable_orphans()

            if now - self._last_usage >= self.usage_interval:
                self._last_usage = now
                if self._sampler is None:
                    self._sampler = UsageSampler(self.client())
                self._sampler.set_tenants(tenants)
                try:
                    self._sampler.tick()
                except redis.RedisError as e:
                    logger.warning("usage tick on %s failed: %s", self.url, type(e).__name__)
        finally:
            self._periodic_lock.release()

    def _disable_orphans(self) -> None:
        """Disable users of Organisms that left shared mode (also while the operator was down)."""
        with self._lock:
            candidates = {acl.username_for(*key) for key in self._not_shared}
        if not candidates:
            return
        client = self.client()
        for username in candidates & acl.list_users(client):
            user = acl.get_user(client, username)
            if user is not None and user.enabled:
                acl.disable_user(client, username)
                logger.info("ACL user %s belongs to an Organism no longer in shared mode: disabled", username)

    def usage_of(self, namespace: str, name: str) -> Usage | None:
        """The organism's usage as of the last complete round, or None before the first one."""
        if self._sampler is None:
            return None
        return self._sampler.latest.get((namespace, name))

    def desired_users(self) -> list[DesiredUser]:
        with self._lock:
            return list(self._desired.values())


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
