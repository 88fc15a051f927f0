"""Redis ACL users for organisms on a shared Redis: one user per organism, confined to its prefix.

The user of an organism may touch only keys and Pub/Sub channels under its prefix and may run only
the commands the library, the pump and the workers issue (`ORGANISM_COMMANDS`, from the library's
contract module). Everything that
acts on the whole server (FLUSHALL, KEYS, CONFIG, ACL, SCRIPT FLUSH, FUNCTION, SELECT, ...) is
denied. Key patterns are checked by Redis for every command, including the commands a function
runs (functions run with the caller's permissions), so FCALL cannot escape the prefix either. Tenants
run Lua only as FCALL of the library's own functions (functions.py): EVAL, EVALSHA and SCRIPT LOAD are
denied.

SCAN is not granted either: it has no key argument, so Redis does not filter it by key patterns and
a tenant allowed to SCAN would see the *names* of every other tenant's keys. The library lists,
counts and clears threads through its per-prefix index instead (`meta:index`, an SSCAN of one key
under the prefix; docs/storage.md), so the whole contract works without it.

Everything here takes an *admin* client (a redis-py client authenticated as a user allowed to run
ACL and COMMAND). Functions are idempotent: applying the same desired state twice writes nothing
the second time.
"""
from __future__ import annotations

import enum
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis
from xml_pipeline import contract
from xml_pipeline.contract import password_hash
from xml_pipeline.memory.keys import validate_prefix

#: The ACL username of Organism `namespace/name`.
username_for = contract.acl_username

# -- the permission set --------------------------------------------------------------------------

#: Every command an organism's user may run: exactly what the library, the pump, the workers and
#: `send` issue (xml_pipeline.contract.LIBRARY_COMMANDS, proven against INFO commandstats by
#: tests/multitenancy/test_command_contract.py), sorted so the rules read the same every time. AUTH
#: and HELLO need no permission (Redis exempts them), so a client can always re-authenticate. Lua
#: runs only as FCALL of the library's functions (functions.py); INFO only for its `server` section.
ORGANISM_COMMANDS: tuple[str, ...] = tuple(sorted(contract.LIBRARY_COMMANDS))

#: Commands that must never be granted to a tenant: they act on the whole server or on every
#: tenant's data (or reveal other tenants' data or activity).
FORBIDDEN_COMMANDS: frozenset[str] = frozenset({
    "flushall", "flushdb", "keys", "scan", "randomkey", "dbsize", "swapdb", "select", "move", "migrate",
    "config", "debug", "acl", "shutdown", "module", "monitor", "replicaof", "slaveof", "sync", "psync",
    "save", "bgsave", "bgrewriteaof", "lastsave", "failover", "cluster", "latency", "slowlog",
    "memory", "object", "info", "pubsub", "function",
    # Lua of the tenant's own making: a script that loops after a write cannot be killed (SCRIPT KILL
    # refuses, only SHUTDOWN NOSAVE ends it), so no tenant may run one.
    "eval", "evalsha", "eval_ro", "evalsha_ro", "script|load", "script|exists", "script|debug",
    "script|flush", "script|kill", "client|kill", "client|list", "client|pause", "client|no-evict",
    "client|tracking", "client|info", "client|reply",
})

#: What a Redis Cluster client must be able to send besides the library's commands: learn the slot
#: map (CLUSTER SLOTS / SHARDS), the command table (COMMAND, redis-py's cluster client reads it to
#: find key positions), follow an ASK redirect during a slot migration (ASKING) and read from replicas
#: (READONLY / READWRITE). None of them reads or writes data or acts on the server; they are granted
#: only on cluster nodes (a one-server Redis refuses them anyway, and its tenants never send them).
CLUSTER_CLIENT_COMMANDS: tuple[str, ...] = ("asking", "cluster|shards", "cluster|slots", "command", "readonly",
                                            "readwrite")

#: What the operator itself needs on the shared Redis, for a platform team that does not want to hand
#: it the `default` user: `ACL SETUSER xp-operator on >PASSWORD ~* resetchannels -@all +<each>`.
#: (ACL SETUSER is inherently powerful: whoever holds it can make any user. `~*` is needed to unlink
#: and measure every organism's keys.)
ADMIN_COMMANDS: tuple[str, ...] = (
    "acl|setuser", "acl|getuser", "acl|deluser", "acl|users", "acl|save",  # organism users
    "client|kill",                       # disabling a user closes its connections
    "command|info",                      # which commands this server knows (server_profile)
    "info",                              # run_id: has the server restarted (recovery)
    "scan", "unlink", "memory|usage",    # cleanup and usage sampling
    "get", "set", "del",                 # cleanup progress under {xp-operator}:
    "hget", "hgetall", "hset", "hdel",   # prefix ownership under {xp-operator}: (ownership.py),
    "watch", "unwatch", "multi", "exec", # claimed in a WATCH transaction
    "fcall_ro", "function|load",         # the function library tenants FCALL (functions.py)
    "ping", "client|setname", "client|setinfo",
    "cluster|nodes",                     # the nodes of a Redis Cluster, to administer each (nodes.py)
)

#: Subcommands that exist only on newer servers; they are granted only where the server knows them
#: (ACL SETUSER rejects an unknown name, e.g. CLIENT SETINFO on Redis 7.0).
_VERSION_DEPENDENT: frozenset[str] = contract.CONNECT_COMMANDS


class Change(enum.Enum):
    """What `ensure_user` had to do."""

    CREATED = "created"
    UPDATED = "updated"
    UNCHANGED = "unchanged"


@dataclass(frozen=True)
class AclUser:
    """A Redis ACL user as ACL GETUSER describes it (passwords are SHA-256 hex digests)."""

    username: str
    enabled: bool
    password_hashes: frozenset[str]
    #: `-@all`, `+get`, ... as a set: Redis does not keep the order stable.
    command_rules: frozenset[str]
    key_patterns: frozenset[str]
    channel_patterns: frozenset[str]
    has_selectors: bool


def server_commands(admin: redis.Redis) -> frozenset[str]:
    """The names of `ORGANISM_COMMANDS` this server knows (COMMAND INFO, one round trip)."""
    tops = sorted({c.split("|")[0] for c in ORGANISM_COMMANDS})
    info = admin.execute_command("COMMAND", "INFO", *tops)
    known: set[str] = set()
    entries: Iterable[Any] = info.values() if isinstance(info, Mapping) else info
    for entry in entries:
        if not entry:
            continue
        name = _s(entry["name"] if isinstance(entry, Mapping) else entry[0]).lower()
        known.add(name)
        subs = entry.get("subcommands", []) if isinstance(entry, Mapping) else (entry[9] if len(entry) > 9 else [])
        for sub in subs or []:
            known.add(_s(sub[0]).lower())
    return frozenset(known)


#: Prefix of a user that never logs in (off, no password, no keys), made and deleted once per server
#: to learn how it describes our command rules. A random suffix keeps concurrent probes apart.
PROBE_USER = "xp-operator-acl-probe-"


@dataclass(frozen=True)
class ServerProfile:
    """What one Redis server knows and how it words our rules. Compute once per server
    (`server_profile`) and pass it to `ensure_user`, so a check costs one ACL GETUSER."""

    available: frozenset[str]
    #: The command rules as ACL GETUSER shows them. Redis rewrites `-@all +get ...` into its own
    #: shortest form (`+@list -lset ...`, version dependent), so the comparison uses the server's
    #: wording of our rules, learnt from a probe user.
    described: frozenset[str]
    #: A Redis Cluster node: its tenants also get CLUSTER_CLIENT_COMMANDS.
    cluster: bool = False


def server_profile(admin: redis.Redis) -> ServerProfile:
    """Learn the server's commands and its description of our rules (a few round trips, once)."""
    available = server_commands(admin)
    cluster = str(admin.info("cluster").get("cluster_enabled", 0)) == "1"
    probe = PROBE_USER + secrets.token_hex(4)
    try:
        cmds = [f"+{c}" for c in granted_commands(available, cluster=cluster)]
        admin.execute_command("ACL", "SETUSER", probe, "reset", "-@all", *cmds)
        raw = _pairs(admin.execute_command("ACL", "GETUSER", probe))
        described = frozenset(_s(raw.get("commands", b"")).split())
    finally:
        admin.execute_command("ACL", "DELUSER", probe)
    return ServerProfile(available=available, described=described, cluster=cluster)


def granted_commands(available: frozenset[str] | None = None, *, cluster: bool = False) -> tuple[str, ...]:
    """`ORGANISM_COMMANDS` minus what the server lacks (version-dependent ones); on a cluster node
    also CLUSTER_CLIENT_COMMANDS."""
    out = []
    for cmd in ORGANISM_COMMANDS:
        if cmd in _VERSION_DEPENDENT and (available is None or cmd not in available):
            continue
        out.append(cmd)
    return tuple(out) + (CLUSTER_CLIENT_COMMANDS if cluster else ())


def acl_rules(prefix: str, *, available: frozenset[str] | None = None, cluster: bool = False) -> list[str]:
    """The ACL SETUSER rules (without passwords and on/off) confining a user to `prefix`.

    `resetkeys ~<prefix>* resetchannels &<prefix>* -@all +<each granted command>`. The prefix is
    validated first: it has no glob characters, so the pattern matches exactly the prefix's keys.
    """
    validate_prefix(prefix, "backend.redis.prefix")
    return ["resetkeys", f"~{prefix}*", "resetchannels", f"&{prefix}*", "-@all",
            *(f"+{c}" for c in granted_commands(available, cluster=cluster))]


# -- reading and writing users -------------------------------------------------------------------

def get_user(admin: redis.Redis, username: str) -> AclUser | None:
    """The user as Redis has it now, or None when it does not exist."""
    raw = admin.execute_command("ACL", "GETUSER", username)
    if raw is None:
        return None
    fields = _pairs(raw)
    flags = {_s(f) for f in fields.get("flags", [])}
    selectors = fields.get("selectors") or []
    return AclUser(
        username=username,
        enabled="on" in flags,
        password_hashes=frozenset(_s(p) for p in fields.get("passwords", [])),
        command_rules=frozenset(_s(fields.get("commands", b"")).split()),
        key_patterns=frozenset(_s(fields.get("keys", b"")).split()),
        channel_patterns=frozenset(_s(fields.get("channels", b"")).split()),
        has_selectors=bool(selectors),
    )


def user_exists(admin: redis.Redis, username: str) -> bool:
    return get_user(admin, username) is not None


def list_users(admin: redis.Redis) -> frozenset[str]:
    """Every username the server has (ACL USERS, one round trip)."""
    return frozenset(_s(u) for u in admin.execute_command("ACL", "USERS"))


def desired_user(username: str, prefix: str, passwords: Sequence[str], profile: ServerProfile, *,
                 enabled: bool = True, extra_hashes: Iterable[str] = ()) -> AclUser:
    """The AclUser that `ensure_user` converges to (what ACL GETUSER shows afterwards)."""
    validate_prefix(prefix, "backend.redis.prefix")
    return AclUser(
        username=username,
        enabled=enabled,
        password_hashes=frozenset(password_hash(p) for p in passwords) | frozenset(extra_hashes),
        command_rules=profile.described,
        key_patterns=frozenset({f"~{prefix}*"}),
        channel_patterns=frozenset({f"&{prefix}*"}),
        has_selectors=False,
    )


def ensure_user(admin: redis.Redis, username: str, password: str, prefix: str, *,
                also_accept: Sequence[str] = (), also_accept_hashes: Iterable[str] = (), enabled: bool = True,
                profile: ServerProfile | None = None) -> Change:
    """Make `username` exist exactly as desired: confined to `prefix`, accepting `password` (and the
    passwords in `also_accept`, or the SHA-256 digests in `also_accept_hashes`, while a rotation is
    in progress) and no other.

    Reads the user first and writes nothing when it already matches. Pass a cached `profile`
    (server_profile) when calling it for many users. A needed change is one
    ACL SETUSER, which Redis applies atomically: passwords are added before stale ones are removed
    in the same call, and connections already authenticated stay authenticated.
    """
    if not password:
        raise ValueError("password must be a non-empty string")
    if profile is None:
        profile = server_profile(admin)
    extra = frozenset(also_accept_hashes)
    if any(len(h) != 64 or any(c not in "0123456789abcdef" for c in h) for h in extra):
        raise ValueError("also_accept_hashes must be lower-case SHA-256 hex digests")
    want = desired_user(username, prefix, [password, *also_accept], profile, enabled=enabled,
                        extra_hashes=extra)
    have = get_user(admin, username)
    if have == want:
        return Change.UNCHANGED
    rules = ["on" if enabled else "off", "clearselectors",
             *acl_rules(prefix, available=profile.available, cluster=profile.cluster)]
    rules += [f">{p}" for p in (password, *also_accept)] + [f"#{h}" for h in sorted(extra)]
    if have is not None:
        rules += [f"!{h}" for h in sorted(have.password_hashes - want.password_hashes)]
    admin.execute_command("ACL", "SETUSER", username, *rules)
    return Change.CREATED if have is None else Change.UPDATED


def disable_user(admin: redis.Redis, username: str) -> bool:
    """Refuse new logins of `username` and drop its open connections (keeps the user and its data).

    `off` alone would let connections that are already authenticated go on working, so they are
    killed too. Returns False when the user does not exist.
    """
    user = get_user(admin, username)
    if user is None:
        return False
    if user.enabled:
        admin.execute_command("ACL", "SETUSER", username, "off")
    admin.execute_command("CLIENT", "KILL", "USER", username)
    return True


def delete_user(admin: redis.Redis, username: str) -> bool:
    """Delete `username` (Redis also closes its connections). False when it did not exist."""
    return int(admin.execute_command("ACL", "DELUSER", username)) > 0


def save_acl(admin: redis.Redis) -> bool:
    """ACL SAVE when the server uses an ACL file, so users survive a restart. False when it has none
    (the operator then relies on recovery.py to re-create users after a restart)."""
    try:
        admin.execute_command("ACL", "SAVE")
        return True
    except redis.ResponseError as e:
        if "ACL file" in str(e) or "aclfile" in str(e).lower():
            return False
        raise


# -- helpers -------------------------------------------------------------------------------------

def _s(v: Any) -> str:
    return v.decode("utf-8", "replace") if isinstance(v, (bytes, bytearray)) else str(v)


def _pairs(raw: Any) -> dict[str, Any]:
    """ACL GETUSER reply (a flat list of pairs, or a dict under RESP3/callbacks) as {str: value}."""
    if isinstance(raw, Mapping):
        return {_s(k): v for k, v in raw.items()}
    items = list(raw)
    return {_s(items[i]): items[i + 1] for i in range(0, len(items) - 1, 2)}
