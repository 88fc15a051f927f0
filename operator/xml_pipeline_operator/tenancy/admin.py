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

The shared Redis may be one server, a Redis Cluster or a Sentinel set (XPO_SHARED_REDIS_URL,
topology.py). ACL users are per node, so every user step runs on every node (fanout.py over the
nodes nodeset.py discovers); the operator's records and the cleanup progress live on one node
(`NodeSet.primary`), the function library is loaded on every master, and cleanup and usage SCAN
every master.

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

from ..model import reserved_prefix_problem
from ..redis_admin import PASSWORD_CHANGED, Tenant, TenantState
from ..settings import OperatorSettings
from . import acl, client_acl, fanout, functions, overlap, ownership
from .cleanup import CleanupProgress, cleanup_prefix
from .nodes import DiscoveryError
from .nodeset import NodeSet
from .recovery import DesiredUser
from .bodies import admissible, deletion_policy, tenant_from_body
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
        self.nodeset = NodeSet(settings, client=client)
        self.nodes = fanout.NodeAdmin(self.nodeset)
        self.url = self.nodeset.describe()
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
        #: One usage sampler per master (a cluster's keys are spread over its masters).
        self._samplers: dict[str, UsageSampler] = {}
        self._last_usage = float("-inf")
        self._last_check = float("-inf")
        #: The function library tenants FCALL was found or loaded (cleared when a check misses it).
        self._functions_ready = False

    # -- connection --------------------------------------------------------------------------------
    def client(self) -> redis.Redis:
        """The node holding the operator's records (the one server; a Sentinel master; the cluster
        master of the `{xp-operator}` hash slot)."""
        return self.nodeset.primary()

    def _unavailable(self, e: Exception, what: str) -> TenantState:
        if isinstance(e, DiscoveryError):
            state = TenantState(False, "SharedRedisUnavailable",
                                f"no node of the shared Redis at {self.url} could be found while {what}: {e}")
        elif isinstance(e, redis.AuthenticationError):
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
                self.nodes.disable(acl.username_for(namespace, name))
                logger.warning("Organism %s/%s has a prefix the operator refuses now: ACL user disabled",
                               namespace, name)
            except (redis.RedisError, DiscoveryError) as e:
                logger.warning("could not disable the ACL user of %s/%s on %s: %s", namespace, name, self.url,
                               type(e).__name__)
        if t is None and was_admitted:
            # Switched away from shared mode: the pods no longer use this Redis, so its user must
            # not keep working (the Secret's password now serves the new mode). Keys stay and expire
            # with their TTL; switching back re-enables the user.
            try:
                self.nodes.disable(acl.username_for(namespace, name))
                logger.info("Organism %s/%s left shared mode: ACL user disabled", namespace, name)
            except (redis.RedisError, DiscoveryError) as e:
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
                    self.nodes.disable(tenant.username)
                except (redis.RedisError, DiscoveryError) as e:
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
                self.nodes.delete(tenant.username)
                logger.info("Organism %s/%s (uid %s) takes back prefix %s retained from uid %s", tenant.namespace,
                            tenant.name, tenant.uid, tenant.prefix, held.uid)
            if refusal is not None:
                with self._lock:
                    self._desired.pop(key, None)
                self.nodes.disable(tenant.username)  # a user made earlier must not keep the keys
                return TenantState(False, refusal.reason, refusal.message)
            if not self._functions_ready:
                self._ensure_functions()
            extra = frozenset(also_accept_hashes)
            unknown = fanout.still_accepted(self.nodes.users(tenant.username), password, extra)
            if unknown:
                # The Secret's password was changed behind the operator's back. Removing the
                # passwords Redis knows would lock out every running pod: the caller records
                # them durably first (rotation.adopt_patch) and calls again.
                return TenantState(False, PASSWORD_CHANGED,
                                   f"the Secret {tenant.name}-credentials holds a password ACL user "
                                   f"{tenant.username!r} does not know yet", still_accepted=unknown)
            spread = self.nodes.ensure_user(tenant.username, password, tenant.prefix, extra)
        except functions.FunctionsUnsupported as e:
            return TenantState(False, "SharedRedisTooOld", f"{e}; shared mode needs a newer shared Redis")
        except (redis.RedisError, DiscoveryError) as e:
            return self._unavailable(e, f"provisioning ACL user {tenant.username!r}")
        if not spread.complete:
            return TenantState(False, "SharedRedisNodeUnavailable",
                               f"ACL user {tenant.username!r} is in place on {len(spread.changes)} node(s) of "
                               f"{self.url}, but node(s) {spread.failure_text()} could not be reached; retrying")
        change = spread.overall()
        self._failed = None
        with self._lock:
            self._desired[key] = DesiredUser(tenant.username, tenant.prefix, password, also_accept_hashes=extra)
        if change is not acl.Change.UNCHANGED:
            logger.info("ACL user %s %s on %s (prefix %s)", tenant.username, change.value, self.url, tenant.prefix)
            self._save_acl()
        message = (f"ACL user {tenant.username!r} may use keys and channels under {tenant.prefix!r} only, "
                   f"on {self.url}" + (f" (on each of its {len(spread.changes)} nodes)" if self.nodeset.clustered
                                       else ""))
        repaired = spread.repaired()
        if repaired:
            message += f"; re-created on node(s) {', '.join(repaired)}, which had lost it"
            logger.warning("ACL user %s re-created on %s (lost there)", tenant.username, ", ".join(repaired))
        if extra:
            message += f"; {len(extra)} other password(s) accepted while a password rotation runs"
        return TenantState(True, "AclUserReady", message, repaired=repaired)

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
            # How each node words the client's rules is learnt once per server profile (a probe user
            # is an ACL write; an idle pass writes none).
            spread = self.nodes.ensure_client(username, password, tenant.prefix, frozenset(also_accept_hashes))
        except (redis.RedisError, DiscoveryError) as e:
            return self._unavailable(e, f"provisioning client ACL user {username!r}")
        if not spread.complete:
            return TenantState(False, "SharedRedisNodeUnavailable",
                               f"client ACL user {username!r} is in place on {len(spread.changes)} node(s), but "
                               f"node(s) {spread.failure_text()} could not be reached; retrying")
        change = spread.overall()
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
        self._every(self.nodes.delete(client_acl.client_username(tenant.namespace, tenant.name)))
        conflict = self.conflict_of(tenant.namespace, tenant.name, tenant.prefix) if tenant.prefix else None
        with self._lock:
            admitted = key in self._desired
        me = ownership.Owner(tenant.namespace, tenant.name, tenant.uid)
        holder = ownership.owner_of(client, tenant.prefix) if tenant.prefix else None
        if holder is not None and not holder.same_organism(me):
            conflict = conflict or overlap.Tenant(holder.namespace, holder.name, tenant.prefix)
        owned = admitted or (holder is not None and holder.same_organism(me)) or self.nodes.exists_anywhere(
            tenant.username)
        if conflict is not None or not tenant.prefix or not owned:
            # This Organism never owned its prefix (it was refused, or never got a user): keys there
            # may be another organism's. Only a user of its own name may go.
            self._every(self.nodes.delete(tenant.username))
            self._forget(key)
            return
        if policy == "Retain":
            self._every(self.nodes.disable(tenant.username))
            ownership.mark_retained(client, tenant.prefix, me)  # the data stays its owner's
            self._save_acl()
            self._forget(key)
            logger.info("ACL user %s disabled; keys under %s retained", tenant.username, tenant.prefix)
            return
        # Delete: no new writes first (disabling also closes the user's connections), then the keys.
        self._every(self.nodes.disable(tenant.username))
        progress_key = PROGRESS_KEY + tenant.prefix
        deleted = (self._cleanup_masters(client, tenant.prefix, progress_key) if self.nodeset.clustered
                   else self._cleanup_one(client, tenant.prefix, progress_key))
        self._every(self.nodes.delete(tenant.username))
        ownership.release(client, tenant.prefix, me)  # no data left: the prefix is free again
        client.delete(progress_key)
        self._save_acl()
        self._forget(key)
        logger.info("removed %d keys under %s and ACL user %s", deleted, tenant.prefix, tenant.username)

    def _cleanup_masters(self, client: redis.Redis, prefix: str, progress_key: str) -> int:
        """Cleanup of a cluster or Sentinel set: SCAN + UNLINK on every master, progress per master."""
        start = fanout.progress_from_json(client.get(progress_key), prefix)
        deadline = time.monotonic() + self.cleanup_budget

        def persist(p: dict[str, CleanupProgress]) -> None:
            client.set(progress_key, fanout.progress_to_json(p), ex=PROGRESS_TTL_SECONDS)

        progress = fanout.cleanup_masters(self.nodeset, prefix, start, batch_size=self.cleanup_batch,
                                          keep_going=lambda: time.monotonic() < deadline, persist=persist)
        if not fanout.progress_done(progress, [m.address for m in self.nodeset.masters()]):
            total = CleanupProgress(prefix=prefix, deleted=fanout.deleted(progress))
            raise CleanupInProgress(total)
        return fanout.deleted(progress)

    def _cleanup_one(self, client: redis.Redis, prefix: str, progress_key: str) -> int:
        raw = client.get(progress_key)
        start = CleanupProgress.from_dict(json.loads(raw)) if raw else None
        deadline = time.monotonic() + self.cleanup_budget

        def persist(p: CleanupProgress) -> None:
            client.set(progress_key, json.dumps(p.as_dict()), ex=PROGRESS_TTL_SECONDS)

        progress = start or CleanupProgress(prefix=prefix)
        while not progress.done:  # at least one batch per call, then as many as the budget allows
            progress = cleanup_prefix(client, prefix, start=progress, batch_size=self.cleanup_batch,
                                      max_batches=1, on_batch=persist)
            if time.monotonic() >= deadline:
                break
        if not progress.done:
            raise CleanupInProgress(progress)
        return progress.deleted

    @staticmethod
    def _every(spread: fanout.Spread) -> None:
        """Deletion steps must reach every node (a node left out keeps a working user): retry else."""
        if not spread.complete:
            raise redis.ConnectionError(f"node(s) {spread.failure_text()} of the shared Redis could not be reached")

    def _ensure_functions(self) -> None:
        """Make sure the function library tenants FCALL is loaded on every master (FunctionsUnsupported
        if it cannot be)."""
        states = self.nodes.ensure_library()
        loaded = sorted(a for a, s in states.items() if s is functions.LibraryState.LOADED)
        if loaded:
            logger.info("function library %s loaded on %s (%s)", functions.library().name, self.url, ", ".join(loaded))
        self._functions_ready = True

    def _save_acl(self) -> None:
        """Best effort: persist users where a node has an ACL file (else recovery covers restarts)."""
        try:
            self.nodes.save()
        except (redis.RedisError, DiscoveryError) as e:
            logger.debug("ACL SAVE on %s not done: %s", self.url, type(e).__name__)

    def _forget(self, key: tuple[str, str]) -> None:
        with self._lock:
            self._desired.pop(key, None)
            self._observed.pop(key, None)
            self._policies.pop(key, None)
            for sampler in self._samplers.values():
                sampler.latest.pop(key, None)

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
                    reports, failures = self.nodes.check(desired)
                except (redis.RedisError, functions.FunctionsUnsupported, DiscoveryError) as e:
                    logger.warning("lost-user check on %s failed: %s", self.url, type(e).__name__)
                else:
                    for address, report in reports.items():
                        if report.changed:
                            where = f"node {address} of {self.url}" if self.nodeset.clustered else self.url
                            logger.warning("shared Redis %s %s: re-created %d ACL user(s), repaired %d%s", where,
                                           "restarted" if report.restarted else "lost users",
                                           len(report.recreated), len(report.repaired),
                                           ", loaded the function library again" if report.functions_reloaded else "")
                    for f in failures:
                        logger.warning("lost-user check: node %s of %s unreachable (%s)", f.node, self.url, f.error)
                    self._disable_orphans()

            if now - self._last_usage >= self.usage_interval:
                self._last_usage = now
                try:
                    for node in self.nodeset.masters():
                        sampler = self._samplers.get(node.address)
                        if sampler is None:
                            sampler = self._samplers[node.address] = UsageSampler(self.nodeset.client(node))
                        sampler.set_tenants(tenants)
                        sampler.tick()
                except (redis.RedisError, DiscoveryError) as e:
                    logger.warning("usage tick on %s failed: %s", self.url, type(e).__name__)
        finally:
            self._periodic_lock.release()

    def _disable_orphans(self) -> None:
        """Disable users of Organisms that left shared mode (also while the operator was down)."""
        with self._lock:
            candidates = {acl.username_for(*key) for key in self._not_shared}
        if not candidates:
            return
        def step(node: object, client: redis.Redis) -> list[str]:
            done = []
            for username in candidates & acl.list_users(client):
                user = acl.get_user(client, username)
                if user is not None and user.enabled:
                    acl.disable_user(client, username)
                    done.append(username)
            return done
        disabled, _ = self.nodeset.each(step)
        for username in sorted({u for users in disabled.values() for u in users}):
            logger.info("ACL user %s belongs to an Organism no longer in shared mode: disabled", username)

    def usage_of(self, namespace: str, name: str) -> Usage | None:
        """The organism's usage as of the last complete round (summed over the masters), or None
        before the first one."""
        found = [u for s in list(self._samplers.values()) if (u := s.latest.get((namespace, name))) is not None]
        if not found:
            return None
        return Usage(threads=sum(u.threads for u in found), keys=sum(u.keys for u in found),
                     approx_bytes=sum(u.approx_bytes for u in found), sampled_keys=sum(u.sampled_keys for u in found),
                     measured_at=max(u.measured_at for u in found))

    def desired_users(self) -> list[DesiredUser]:
        with self._lock:
            return list(self._desired.values())
