"""The client ACL user of an organism: what a team's own pods may do with the organism's Redis.

The pump and workers log in as the organism's user (acl.py: everything under the prefix). A team's
web service or batch job only talks to the organism, so it gets a second user with the rights of
the library's client API (xml_pipeline.client) and nothing more:

- `CLIENT_COMMANDS`, the commands the client API issues (no FCALL, FCALL_RO, EVAL, DEL, ...);
- key permissions by Redis 7 selectors: `%W~<prefix>ingress` (XADD and EXPIRE, but no read of what
  other clients sent), `%R~` on egress, the context buffers, the registry and the thread index;
- no Pub/Sub channel at all;
- on a Redis Cluster node, the cluster's key names and the commands a cluster client sends to find
  each key's node (contract.CLUSTER_CLIENT_KEYS, client_commands("cluster")): all from the library's
  contract, none kept here.

Every read of the client API is a plain command, so the user needs no scripts: without FCALL it cannot
run a write function of the organism's library, and without FCALL_RO it cannot even run read ones
(FCALL_RO would be safe -- Redis refuses it for functions not flagged no-writes -- but nothing needs
it). Temporary worker data, task and result streams, append ids and the dead-letter stream are out of
reach (NOPERM), as is every other tenant's prefix.

What remains possible for a client and is accepted: XADD's MAXLEN/MINID options and EXPIRE can trim or
expire the ingress stream (Redis cannot restrict a command's arguments), i.e. a client can disturb
delivery of other clients' unread messages -- never read them, never touch the context.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import redis

from ..desired.binding import client_rules, config_line, granted_commands, key_patterns
from ..desired.binding import client_username as binding_client_username
from .acl import AclUser, Change, _pairs, _s, get_user, password_hash, server_commands

__all__ = ["NEVER", "client_rules", "client_username", "config_line", "described_commands", "desired_user",
           "ensure_client_user", "granted_commands", "key_patterns"]
#: A client user never gets these, whatever CLIENT_COMMANDS says (a test checks the intersection).
NEVER: frozenset[str] = frozenset({
    "fcall", "fcall_ro", "eval", "evalsha", "eval_ro", "evalsha_ro", "function", "script|load",
    "del", "unlink", "set", "rpush", "lpush", "hset", "hsetnx", "sadd", "srem", "xdel", "xack", "xgroup|create",
    "xreadgroup", "xautoclaim", "xclaim", "xtrim", "keys", "scan", "flushall", "flushdb", "config", "acl",
})


def client_username(namespace: str, name: str) -> str:
    """`xpc-<namespace>.<name>`: never equal to an organism's own user (`xp-...`), whatever the names."""
    return binding_client_username(namespace, name)


def described_commands(admin: redis.Redis, available: frozenset[str], *, cluster: bool = False) -> frozenset[str]:
    """How this server words the client's command rules (ACL GETUSER of a probe user that never logs in)."""
    import secrets
    probe = "xp-operator-acl-probe-" + secrets.token_hex(4)
    try:
        admin.execute_command("ACL", "SETUSER", probe, "reset", "-@all",
                              *(f"+{c}" for c in granted_commands(available, cluster=cluster)))
        raw = _pairs(admin.execute_command("ACL", "GETUSER", probe))
        return frozenset(_s(raw.get("commands", b"")).split())
    finally:
        admin.execute_command("ACL", "DELUSER", probe)


def desired_user(username: str, prefix: str, passwords: Sequence[str], described: frozenset[str], *,
                 extra_hashes: Iterable[str] = (), cluster: bool = False) -> AclUser:
    return AclUser(username=username, enabled=True,
                   password_hashes=frozenset(password_hash(p) for p in passwords) | frozenset(extra_hashes),
                   command_rules=described, key_patterns=frozenset(key_patterns(prefix, cluster=cluster)),
                   channel_patterns=frozenset(), has_selectors=False)


def ensure_client_user(admin: redis.Redis, username: str, password: str, prefix: str, *,
                       also_accept_hashes: Iterable[str] = (),
                       available: frozenset[str] | None = None,
                       described: frozenset[str] | None = None, cluster: bool = False) -> Change:
    """Make the client user exist exactly as desired (one ACL SETUSER when it differs, else nothing).
    Accepts `password` and the SHA-256 digests in `also_accept_hashes` (a rotation in progress). On a
    Redis Cluster node (`cluster`) the user gets the cluster's key layout and topology commands
    (contract.CLUSTER_CLIENT_KEYS, CLUSTER_TOPOLOGY_COMMANDS); pass `described` for the same mode."""
    if not password:
        raise ValueError("password must be a non-empty string")
    if available is None:
        available = server_commands(admin)
    if described is None:
        described = described_commands(admin, available, cluster=cluster)
    extra = frozenset(also_accept_hashes)
    want = desired_user(username, prefix, [password], described, extra_hashes=extra, cluster=cluster)
    have = get_user(admin, username)
    if have == want:
        return Change.UNCHANGED
    rules = ["on", "clearselectors", *client_rules(prefix, available=available, cluster=cluster), f">{password}",
             *(f"#{h}" for h in sorted(extra))]
    if have is not None:
        rules += [f"!{h}" for h in sorted(have.password_hashes - want.password_hashes)]
    admin.execute_command("ACL", "SETUSER", username, *rules)
    return Change.CREATED if have is None else Change.UPDATED
