"""The contract between the library and the operator: every name both sides must agree on.

The operator writes what a pod reads (environment, config mount, key prefix, ACL user, labels) and
grants the Redis commands the library sends; both import the values from here, so they cannot drift.
The Helm chart and the CRD cannot import: a test compares their literals with these values.
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import KW_ONLY, dataclass
from types import MappingProxyType
from typing import Final, Literal

from .errors import ConfigError

# -- the pod environment --------------------------------------------------------------------------

ENV_CONFIG: Final = "XP_CONFIG"
ENV_ORGANISM: Final = "XP_ORGANISM"
ENV_ROLE: Final = "XP_ROLE"
ENV_BACKEND_TYPE: Final = "XP_BACKEND_TYPE"
ENV_REDIS_URL: Final = "XP_REDIS_URL"
ENV_REDIS_USERNAME: Final = "XP_REDIS_USERNAME"
ENV_REDIS_PASSWORD: Final = "XP_REDIS_PASSWORD"
ENV_REDIS_PREFIX: Final = "XP_REDIS_PREFIX"
ENV_REDIS_TTL: Final = "XP_REDIS_TTL"
ENV_SIGNING_KEY: Final = "XP_SIGNING_KEY"

#: The variables that override a BackendConfig field (env name -> field), and only these.
BACKEND_ENV: Mapping[str, str] = MappingProxyType({
    ENV_BACKEND_TYPE: "backend_type",
    ENV_REDIS_URL: "redis_url",
    ENV_REDIS_USERNAME: "redis_username",
    ENV_REDIS_PASSWORD: "redis_password",
    ENV_REDIS_PREFIX: "redis_prefix",
    ENV_REDIS_TTL: "redis_ttl",
    ENV_SIGNING_KEY: "signing_key",
})
#: Every XP_* variable the library reads (the operator sets no other).
ENV_NAMES: frozenset[str] = frozenset({ENV_CONFIG, ENV_ORGANISM, ENV_ROLE, *BACKEND_ENV})

# -- roles ----------------------------------------------------------------------------------------

Role = Literal["pump", "worker"]
#: The pod roles: `xml-pipeline <role>` is the command the pod runs, XP_ROLE says which it must be.
ROLES: tuple[Role, ...] = ("pump", "worker")


def check_role(command: str, environ: Mapping[str, str]) -> Role | None:
    """The role XP_ROLE names, checked against the command the process runs; None when unset.

    A pod whose XP_ROLE disagrees with its command (a hand-edited Deployment running `worker` in the
    pump's pod) would consume the wrong streams under the wrong Service: refuse to start.
    """
    role = environ.get(ENV_ROLE)
    if not role:
        return None
    if role not in ROLES:
        raise ConfigError(ENV_ROLE, f"is {role!r}", ROLES)
    if command in ROLES and command != role:
        raise ConfigError(ENV_ROLE, f"is {role!r} but this process runs `xml-pipeline {command}`",
                          (command,))
    return role


# -- the config mount -----------------------------------------------------------------------------

CONFIG_DIR: Final = "/etc/xml-pipeline"
CONFIG_FILE: Final = "organism.yaml"
#: Where pods find their organism.yaml (the operator mounts its ConfigMap here, XP_CONFIG names it).
CONFIG_PATH: Final = f"{CONFIG_DIR}/{CONFIG_FILE}"

# -- key prefix and key spaces --------------------------------------------------------------------

#: The first segment of every default prefix: on a shared Redis the space under it is the operator's.
DEFAULT_PREFIX_SPACE: Final = "xp:"


def default_prefix(namespace: str, name: str) -> str:
    """The key prefix of Organism `namespace/name` when its spec names none. Kubernetes names have no
    dots or colons, so two Organisms never get overlapping defaults."""
    return f"{DEFAULT_PREFIX_SPACE}{namespace}.{name}:"


#: The names the library uses right after the prefix (docs/storage.md). A prefix segment may not be
#: one of them: tenant "a:" scanning "a:buffer:*" would otherwise match tenant "a:buffer:x:".
KEY_SPACES: frozenset[str] = frozenset(
    {"buffer", "chain", "uuid", "op", "tmp", "tasks", "results", "dlq", "ingress", "egress", "meta"}
)
#: The key space of thread buffers: `{prefix}buffer:{<thread_id>}`, one per thread.
BUFFER_SPACE: Final = "buffer"
#: The SET (under the prefix) that lists a prefix's threads and registry chains.
INDEX_KEY: Final = "meta:index"

# -- the Kubernetes API and labels ----------------------------------------------------------------

GROUP: Final = "xml-pipeline.dev"
VERSION: Final = "v1alpha1"
KIND: Final = "Organism"
PLURAL: Final = "organisms"
API_VERSION: Final = f"{GROUP}/{VERSION}"

LABEL_NAME: Final = "app.kubernetes.io/name"
LABEL_INSTANCE: Final = "app.kubernetes.io/instance"
LABEL_COMPONENT: Final = "app.kubernetes.io/component"
LABEL_MANAGED_BY: Final = "app.kubernetes.io/managed-by"
#: `<label>: <organism name>` on every object the operator makes for an Organism.
LABEL_ORGANISM: Final = f"{GROUP}/organism"
#: Pod label of other pods of the namespace allowed to reach an organism's dedicated Redis.
LABEL_REDIS_CLIENT: Final = f"{GROUP}/redis-client"
#: Pod label of a client pod (`xml-pipeline send`) of an organism.
LABEL_CLIENT: Final = f"{GROUP}/client"
APP_NAME: Final = "xml-pipeline"
MANAGED_BY: Final = "xml-pipeline-operator"

# -- the ACL user on a shared Redis ---------------------------------------------------------------


def acl_username(namespace: str, name: str) -> str:
    """The Redis ACL user of Organism `namespace/name` (namespaces have no dots: unique)."""
    return f"xp-{namespace}.{name}"


def password_hash(password: str) -> str:
    """How Redis stores a password (ACL SETUSER #<hash>, ACL GETUSER shows these)."""
    return hashlib.sha256(password.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Tenant:
    """One Organism using a shared Redis: its prefix and ACL user."""

    namespace: str
    name: str
    prefix: str
    _: KW_ONLY
    #: metadata.creationTimestamp (RFC 3339, so it sorts as text); "" sorts first.
    created: str = ""
    #: metadata.uid (recorded as the prefix's owner on a shared Redis).
    uid: str = ""
    #: Its ACL user (`acl_username` unless the Secret names another); "" when not known yet.
    username: str = ""

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def order(self) -> tuple[str, str, str]:
        """Who came first among overlapping prefixes: creation time, then namespace/name."""
        return (self.created, self.namespace, self.name)


# -- the Redis commands the library sends ---------------------------------------------------------
# Lower-case, `container|sub` for subcommands, including what the library's Lua functions call
# (Redis checks those against the caller's ACL too). A test runs every library path on a real server
# and compares INFO commandstats with these sets, both ways.

#: RedisBackend (SharedBackend protocol, ContextBuffer, ThreadRegistry, reindex, info), as any
#: client of the organism uses it (`xml-pipeline send`, `backend` tools).
BACKEND_COMMANDS: frozenset[str] = frozenset({
    "ping", "client|setname", "info|server",
    "fcall", "fcall_ro",
    "rpush", "rpop", "lrange", "lindex", "llen",
    "hsetnx", "hget", "hdel",
    "get", "getex", "mget", "set", "del", "unlink", "exists", "expire",
    "sadd", "srem", "srandmember", "sscan",
})
#: How the scripts run on a server without the function library (a dedicated Redis): never granted
#: to a tenant of a shared Redis, where the operator loads the library.
EVAL_COMMANDS: frozenset[str] = frozenset({"evalsha", "eval"})
#: The pump, the workers and `send`: streams, consumer groups, the heartbeat and egress functions.
STREAM_COMMANDS: frozenset[str] = frozenset({
    "xadd", "xreadgroup", "xread", "xack", "xdel", "xautoclaim", "xclaim", "xpending", "xlen",
    "xrange", "xrevrange", "xgroup|create", "xgroup|delconsumer",
    "multi", "exec", "expire", "del", "unlink", "hsetnx", "fcall",
})
#: Version-dependent: redis-py sends CLIENT SETINFO on connect to Redis >= 7.2 (ignores a refusal).
CONNECT_COMMANDS: frozenset[str] = frozenset({"client|setinfo"})
#: Everything an organism's pods and clients send on a shared Redis (its ACL user's grant).
LIBRARY_COMMANDS: frozenset[str] = BACKEND_COMMANDS | STREAM_COMMANDS | CONNECT_COMMANDS
#: Every Redis command the client API (xml_pipeline.client) issues, lower-case (`container|sub` for subcommands): the command
#: rules of an organism's client ACL user are exactly these. Connection: redis-py's CLIENT SETNAME
#: (CLIENT SETINFO on Redis >= 7.2) and PING. Sending: MULTI, XADD + EXPIRE of the ingress stream,
#: EXEC (message_bus.ingress.send_message). Answers: XREVRANGE (where to start) and XREAD BLOCK of
#: egress. Threads: LRANGE/LINDEX/LLEN/EXISTS of a buffer, GET of registry keys, SSCAN of the index.
CLIENT_COMMANDS: tuple[str, ...] = (
    "ping", "client|setname", "client|setinfo",
    "multi", "exec", "xadd", "expire",
    "xread", "xrevrange",
    "lrange", "lindex", "llen", "exists", "get", "sscan",
)

#: The keys under the organism's prefix a client touches, and how: "W" write only (it may XADD to the
#: ingress stream but not read what other clients sent), "R" read only. Suffixes after the prefix;
#: a trailing `*` matches the thread or chain part. Nothing else (tasks, results, temporary worker
#: data, append ids, the dead-letter stream) is reachable.
CLIENT_KEYS: tuple[tuple[str, str], ...] = (
    ("ingress", "W"),
    ("egress", "R"),
    ("buffer:*", "R"),
    ("chain:*", "R"),
    ("uuid:*", "R"),
    ("meta:index", "R"),
)


#: `xml-pipeline backend reindex` (RedisBackend.reindex) rebuilds the index with SCAN, which a tenant
#: is never granted (it would list other tenants' key names): an admin runs it.
REINDEX_COMMANDS: frozenset[str] = frozenset({"scan"})
