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
#: On a Redis Cluster the index is split into this many SETs, `meta:index:{<prefix><n>}` for n in
#: 0..N-1, each in a slot of its own (an entry goes to crc32(entry) mod N), so one organism's
#: listing load spreads over up to N masters. A constant, not a setting: every process of an
#: organism must agree on it, and a listing reads all N.
CLUSTER_INDEX_BUCKETS: Final = 16
#: On a Redis Cluster an organism's tasks stream is split into this many streams,
#: `tasks:{<tag n>}` for n in 0..N-1 (each with its dead-letter stream `dlq:{<tag n>}`), whose hash
#: tags are picked so that their slots are spread evenly over the slot space
#: (memory/keys.py ClusterKeys.task_buckets): the task traffic of one organism then spreads over up to
#: N masters. A constant for the reason the index's is: every pump, worker and the operator's KEDA
#: triggers must agree on it (docs/storage.md, "Why 16 task buckets").
CLUSTER_TASKS_BUCKETS: Final = 16

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
#: What any client on a Redis Cluster (redis-py's RedisCluster, under RedisClusterBackend and the
#: client API alike) sends to find the node of each key. None reads or writes data:
#:   cluster|slots    the slot map, read from a seed on connect and again after MOVED or a lost node
#:   command          the command table (first/last key positions), read once per client
#:   command|getkeys  the keys of a command whose key positions move with its arguments: redis-py
#:                    asks the server for those ClusterClient does not parse itself (it does
#:                    XREAD, XREADGROUP, FCALL, FCALL_RO; EVAL/EVALSHA without the function library)
#:   asking           sent before a command redirected by ASK (its slot is being migrated: reshard)
#: Not here: READONLY / READWRITE (sent only by a client that reads from replicas; the library reads
#: from masters) and CLUSTER SHARDS / NODES (redis-py maps slots with CLUSTER SLOTS).
CLUSTER_TOPOLOGY_COMMANDS: frozenset[str] = frozenset({"cluster|slots", "command", "command|getkeys", "asking"})
#: WAIT after each write, in any mode, when backend.redis_wait_replicas is set (opt-in durability on
#: a server with replicas: Sentinel, a cluster, a replicated single server). Not in LIBRARY_COMMANDS
#: (a default backend never sends it) but granted to every tenant: it only holds the caller's own
#: connection until its writes reach the replicas.
DURABILITY_COMMANDS: frozenset[str] = frozenset({"wait"})
#: What a backend on a Redis Cluster sends besides BACKEND_COMMANDS and STREAM_COMMANDS: the topology
#: commands, the expiry refresh of keys that live in other slots than their thread (PEXPIRE of the
#: chain keys and index buckets, redis_cluster_index.py), and WAIT. A tenant's ACL user gets these
#: on every cluster node.
CLUSTER_COMMANDS: frozenset[str] = CLUSTER_TOPOLOGY_COMMANDS | {"pexpire"} | DURABILITY_COMMANDS
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
#: The same on a Redis Cluster, whose layout differs (memory/keys.py ClusterKeys): the ingress and
#: egress streams carry the organism's hash tag (`<prefix>` stands for the prefix), the index is
#: CLUSTER_INDEX_BUCKETS sets `meta:index:{<prefix><n>}`. Buffers and registry keys keep their names
#: (`chain:{<chain>}` on a cluster). A client there also sends CLUSTER_TOPOLOGY_COMMANDS.
CLUSTER_CLIENT_KEYS: tuple[tuple[str, str], ...] = (
    ("ingress:{<prefix>}", "W"),
    ("egress:{<prefix>}", "R"),
    ("buffer:*", "R"),
    ("chain:*", "R"),
    ("uuid:*", "R"),
    ("meta:index:*", "R"),
)


def client_commands(mode: RedisMode = "standalone") -> tuple[str, ...]:
    """The commands of an organism's client ACL user on a server of `mode` (its nodes' grant)."""
    if mode == "cluster":
        return CLIENT_COMMANDS + tuple(sorted(CLUSTER_TOPOLOGY_COMMANDS))
    return CLIENT_COMMANDS


def client_key_patterns(prefix: str, mode: RedisMode = "standalone") -> tuple[tuple[str, str], ...]:
    """(Redis key pattern, "R" or "W") of every key an organism's client may touch, for `prefix` (a
    validated prefix: no glob characters) on a server of `mode`."""
    keys = CLUSTER_CLIENT_KEYS if mode == "cluster" else CLIENT_KEYS
    return tuple((prefix + suffix.replace("<prefix>", prefix), how) for suffix, how in keys)


#: `xml-pipeline backend reindex` (RedisBackend.reindex) rebuilds the index with SCAN, which a tenant
#: is never granted (it would list other tenants' key names): an admin runs it.
REINDEX_COMMANDS: frozenset[str] = frozenset({"scan"})


# -- which Redis topology a URL names -------------------------------------------------------------
# The URL in XP_REDIS_URL / backend.redis_url picks the mode (docs/storage.md, "Which mode to pick"):
#   redis://host[:port][/db], rediss://..., unix:///path        one server (standalone)
#   redis+cluster://host:port[,host:port...]                    Redis Cluster: seed nodes
#   redis+sentinel://host:port[,host:port...]/<master-name>      Sentinel: the sentinels, the master
# with `rediss+` for TLS. Credentials are never part of a cluster or sentinel URL: they come from
# XP_REDIS_USERNAME / XP_REDIS_PASSWORD (backend.redis_username / redis_password), the same for every
# node (the operator creates the ACL user on each).

RedisMode = Literal["standalone", "cluster", "sentinel"]
REDIS_MODES: tuple[RedisMode, ...] = ("standalone", "cluster", "sentinel")
STANDALONE_SCHEMES: tuple[str, ...] = ("redis", "rediss", "unix")
CLUSTER_SCHEMES: tuple[str, ...] = ("redis+cluster", "rediss+cluster")
SENTINEL_SCHEMES: tuple[str, ...] = ("redis+sentinel", "rediss+sentinel")
REDIS_URL_SCHEMES: tuple[str, ...] = (*STANDALONE_SCHEMES, *CLUSTER_SCHEMES, *SENTINEL_SCHEMES)
#: Port of a node named without one.
DEFAULT_REDIS_PORT: Final = 6379
DEFAULT_SENTINEL_PORT: Final = 26379
#: What a redis_url may look like (the `allowed` text of every URL error).
REDIS_URL_FORMS: Final = ("redis://host[:port][/db], rediss://host[:port][/db], unix:///path/to/socket, "
                          "redis+cluster://host:port[,host:port...], rediss+cluster://..., "
                          "redis+sentinel://host:port[,host:port...]/<master-name>, rediss+sentinel://...")
_MASTER_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")
_MAX_NODES = 64


@dataclass(frozen=True)
class RedisTarget:
    """What a redis_url names. `nodes` are the cluster's seed nodes or the sentinels (empty for a
    standalone URL, which redis-py reads itself); `master_name` is set in sentinel mode only."""

    mode: RedisMode
    tls: bool
    nodes: tuple[tuple[str, int], ...] = ()
    master_name: str | None = None


def redis_mode(url: str) -> RedisMode:
    """The mode a URL's scheme selects (no other validation; `parse_redis_url` checks the rest)."""
    scheme = url.partition("://")[0].lower()
    if scheme in CLUSTER_SCHEMES:
        return "cluster"
    if scheme in SENTINEL_SCHEMES:
        return "sentinel"
    return "standalone"


def parse_redis_url(url: object, field: str = "redis_url") -> RedisTarget:
    """Parse a cluster or sentinel URL into its nodes (and master name); a standalone URL gives its
    mode and TLS only. Raises ConfigError naming `field` and the allowed forms."""
    if not isinstance(url, str) or not url:
        raise ConfigError(field, f"must be a non-empty string, got {url!r}", REDIS_URL_FORMS)
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in REDIS_URL_SCHEMES:
        shown = scheme if sep else url[:40]
        raise ConfigError(field, f"has the scheme {shown!r}", REDIS_URL_FORMS)
    mode = redis_mode(url)
    tls = scheme.startswith("rediss")
    if mode == "standalone":
        return RedisTarget("standalone", tls)
    netloc, slash, path = rest.partition("/")
    if "?" in rest or "#" in rest:
        raise ConfigError(field, f"{scheme}:// URLs take no query or fragment", REDIS_URL_FORMS)
    if "@" in netloc:
        raise ConfigError(field, f"a {scheme}:// URL may not carry credentials",
                          "the node list only; set XP_REDIS_USERNAME / XP_REDIS_PASSWORD "
                          "(backend.redis_username / redis_password) instead")
    default_port = DEFAULT_SENTINEL_PORT if mode == "sentinel" else DEFAULT_REDIS_PORT
    nodes = tuple(parse_redis_node(item, default_port, field) for item in netloc.split(","))
    if len(nodes) > _MAX_NODES:
        raise ConfigError(field, f"names {len(nodes)} nodes, at most {_MAX_NODES} are accepted", REDIS_URL_FORMS)
    if mode == "cluster":
        if path not in ("", "0"):
            raise ConfigError(field, f"has the path /{path}: a Redis Cluster has only database 0",
                              "redis+cluster://host:port[,host:port...] with no path")
        return RedisTarget("cluster", tls, nodes)
    if not slash or not path:
        raise ConfigError(field, "names no master: a sentinel URL ends with /<master-name>",
                          "redis+sentinel://host:port[,host:port...]/<master-name>, e.g. "
                          "redis+sentinel://s1:26379,s2:26379/mymaster")
    if not set(path) <= _MASTER_NAME_CHARS or len(path) > 128:
        raise ConfigError(field, f"master name {path[:40]!r} is not valid",
                          "letters, digits, '_', '.', '-' (at most 128), e.g. mymaster")
    return RedisTarget("sentinel", tls, nodes, path)


def parse_redis_node(item: str, default_port: int, field: str) -> tuple[str, int]:
    """One `host[:port]` or `[ipv6]:port` of a node list (`default_port` when none is named).
    Raises ConfigError naming `field`."""
    allowed = "host[:port] or [ipv6]:port, comma-separated, e.g. redis-0:6379,redis-1:6379"
    if not item:
        raise ConfigError(field, "has an empty node in its node list (stray comma?)", allowed)
    if item.startswith("["):
        host, bracket, tail = item[1:].partition("]")
        if not bracket or (tail and not tail.startswith(":")):
            raise ConfigError(field, f"node {item[:80]!r} is malformed", allowed)
        port_text = tail[1:] if tail else ""
    else:
        host, colon, port_text = item.partition(":")
        if colon and not port_text:
            raise ConfigError(field, f"node {item[:80]!r} has an empty port", allowed)
    if not host or any(c in host for c in " /\\[]:") and not item.startswith("["):
        raise ConfigError(field, f"node {item[:80]!r} names no valid host", allowed)
    if not port_text:
        return host, default_port
    if not (port_text.isascii() and port_text.isdigit()) or not 1 <= int(port_text) <= 65535:
        raise ConfigError(field, f"node {item[:80]!r} has the port {port_text[:12]!r}", "a port 1..65535")
    return host, int(port_text)
