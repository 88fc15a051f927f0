"""Many organisms on one shared Redis: ACL users, prefix overlap, cleanup, usage, recovery.

Pure logic and Redis administration only (no Kubernetes): every function takes an admin redis-py
client, so all of it is tested against a real redis-server. The operator's handlers call it.

- `acl`      one ACL user per organism, confined to its prefix; password rotation steps
- `overlap`  refuse an organism whose prefix overlaps an earlier one's
- `ownership` who owns a prefix, recorded on the shared Redis (kept with retained data)
- `functions` the library's Lua as a Redis Functions library: tenants FCALL it, never EVAL
- `cleanup`  delete an organism's keys (SCAN + UNLINK, resumable)
- `usage`    per-organism threads/keys/bytes with bounded work per tick
- `recovery` re-create users a restarted Redis has lost
- `nodes`    the nodes of a Redis Cluster or Sentinel set (CLUSTER NODES, SENTINEL replies; pure parsers)
- `nodeset`  an admin client per node, discovery refreshed after failures
- `fanout`   each user step on every node; what it did per node (a repaired node is named)
- `bodies`   what the tenancy code reads from Organism objects (pure)
- `admin`    SharedRedisAdmin: the operator's RedisAdmin for shared mode, built from the above
- `handlers` the kopf index and timer it needs (imported by the operator's handlers only)

docs/multi-tenancy.md describes the model, its guarantees and its limits.
"""
from __future__ import annotations

from .acl import (
    ADMIN_COMMANDS,
    FORBIDDEN_COMMANDS,
    ORGANISM_COMMANDS,
    AclUser,
    Change,
    ServerProfile,
    acl_rules,
    delete_user,
    disable_user,
    ensure_user,
    get_user,
    list_users,
    password_hash,
    save_acl,
    server_profile,
    user_exists,
    username_for,
)
from .admin import CleanupInProgress, SharedRedisAdmin
from .cleanup import CleanupProgress, cleanup_prefix
from .functions import FunctionsUnsupported, LibraryState, ensure_library, library_loaded
from .ownership import OWNERS_KEY, Owner, Refusal, claim, find_refusal
from .overlap import Tenant, conflict_message, find_conflict, find_overlaps
from .recovery import DesiredUser, RecoveryReport, UserRecovery
from .usage import TickCost, Usage, UsageSampler

__all__ = [
    "ADMIN_COMMANDS", "CleanupInProgress", "ServerProfile", "SharedRedisAdmin", "save_acl", "server_profile",
    "FORBIDDEN_COMMANDS", "ORGANISM_COMMANDS", "AclUser", "Change", "CleanupProgress", "DesiredUser",
    "RecoveryReport", "Tenant", "TickCost", "Usage", "UsageSampler", "UserRecovery",
    "acl_rules", "cleanup_prefix", "conflict_message", "delete_user", "disable_user", "ensure_user",
    "find_conflict", "find_overlaps", "get_user", "list_users", "password_hash",
    "user_exists", "username_for",
    "FunctionsUnsupported", "LibraryState", "ensure_library", "library_loaded",
    "OWNERS_KEY", "Owner", "Refusal", "claim", "find_refusal",
]
