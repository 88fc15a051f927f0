"""Key layout of the Redis backend and the rules that keep tenants apart.

Every key starts with the tenant prefix, then a key-space name. The keys of one thread carry the
thread id as a Redis Cluster hash tag (`{...}`), so they live in one slot:

    {prefix}buffer:{<thread_id>}   LIST of signed slot blobs (index = position)
    {prefix}op:{<thread_id>}       HASH append_id -> index given to that append (idempotent retries)
    {prefix}uuid:{<thread_id>}     STRING: the call chain of that thread (registry reverse map)
    {prefix}chain:<chain>          STRING: the thread uuid of a call chain (registry forward map);
                                   the one key that cannot share the thread's hash tag
    {prefix}tmp:{<id>}             STRING: temporary worker data (payloads, responses)
    {prefix}meta:index             SET: "t:<thread_id>" per thread, "c:<chain>" per registry
                                   mapping; how the library lists and clears without SCAN
    {prefix}<space>:...            tasks / results / dlq / ingress / egress / meta: the pump's keys,
                                   built with RedisKeys.key()

On a Redis Cluster (ClusterKeys) two keys change, so that each lands in a slot of its own:

    {prefix}chain:{<chain>}        the chain is its own hash tag (it cannot share its thread's)
    {prefix}meta:index:{<prefix><n>}  the index split into CLUSTER_INDEX_BUCKETS sets (n = 0..15)
    {prefix}<space>:{<prefix>}[:...]  the pump's streams and records, in one slot per organism
    {prefix}tasks:{<tag n>}, {prefix}dlq:{<tag n>}  the tasks stream and its dead letters split into
                                   CLUSTER_TASKS_BUCKETS buckets, slots spread evenly (task_buckets);
                                   their doorbell is key("tasks", "wake"), in the organism's slot

Thread ids and tmp ids may not contain '{' or '}' (it would move the hash tag). Listing and
clearing walk the index (SSCAN of one key under the prefix): Redis cannot confine SCAN to a prefix,
so a tenant's ACL user is not granted it. Where SCAN is used (an admin sweeping a prefix, `reindex`)
its MATCH pattern is made of the escaped prefix and one key space, so a validated prefix can never
match another tenant's keys. docs/storage.md explains the layout and the guarantees in full.
"""
from __future__ import annotations

import re
import zlib

from ..contract import CLUSTER_INDEX_BUCKETS, CLUSTER_TASKS_BUCKETS, INDEX_KEY, KEY_SPACES
from ..errors import ConfigError

__all__ = ["ClusterKeys", "KEY_SPACES", "MAX_PREFIX_LEN", "RedisKeys", "check_tagged_id", "glob_escape", "key_slot",
           "prefixes_overlap", "validate_prefix"]

_SEGMENT = r"[A-Za-z0-9_.-]+"
#: Hash slots of a Redis Cluster.
CLUSTER_SLOTS = 16384
_PREFIX_RE = re.compile(rf"^(?:{_SEGMENT}:)+\Z")  # \Z: "$" would pass "xp:\n"
MAX_PREFIX_LEN = 128


def validate_prefix(prefix: object, field: str = "redis_prefix") -> str:
    """Return `prefix` if it is a safe tenant prefix, else raise ConfigError naming `field`.

    Safe means: segments of `[A-Za-z0-9_.-]` each ending in ':' (so no glob characters and no
    braces), no segment equal to a key-space name, at most 128 characters.
    """
    allowed = "segments of letters, digits, '_', '.', '-' each followed by ':', e.g. 'xp:' or 'xp:team-a.orders:'"
    if not isinstance(prefix, str) or not prefix:
        raise ConfigError(field, f"must be a non-empty string, got {prefix!r}", allowed)
    if len(prefix) > MAX_PREFIX_LEN:
        raise ConfigError(field, f"is {len(prefix)} characters long, the maximum is {MAX_PREFIX_LEN}", allowed)
    if not _PREFIX_RE.match(prefix):
        raise ConfigError(field, f"{prefix!r} is not a valid prefix", allowed)
    reserved = [s for s in prefix.split(":")[:-1] if s in KEY_SPACES]
    if reserved:
        raise ConfigError(
            field,
            f"{prefix!r} contains the segment {reserved[0]!r}, a key-space name of the library "
            f"(reserved: {', '.join(sorted(KEY_SPACES))})",
            allowed,
        )
    return prefix


def prefixes_overlap(a: str, b: str) -> bool:
    """True when one tenant's keys could fall under the other's prefix (equal, or one starts the other)."""
    return a.startswith(b) or b.startswith(a)


_GLOB_SPECIAL = frozenset("*?[]\\^")


def glob_escape(text: str) -> str:
    """`text` with Redis glob characters escaped, for a SCAN MATCH pattern that matches it literally."""
    return "".join("\\" + c if c in _GLOB_SPECIAL else c for c in text)


def check_tagged_id(value: object, what: str) -> str:
    """Return `value` if it can be a hash-tagged id (thread id, tmp id), else raise ValueError."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty string, got {value!r}")
    if "{" in value or "}" in value:
        raise ValueError(f"{what} {value!r} may not contain '{{' or '}}' (they would move the Redis hash tag)")
    return value


class RedisKeys:
    """Builds the keys and SCAN patterns of one tenant prefix (the layout in this module's docstring)."""

    __slots__ = ("prefix", "_chain")

    def __init__(self, prefix: str) -> None:
        self.prefix = validate_prefix(prefix)
        self._chain = f"{prefix}chain:"

    # -- one thread (all share the hash tag {thread_id}) ------------------------------------------
    def buffer(self, thread_id: str) -> str:
        return f"{self.prefix}buffer:{{{thread_id}}}"

    def op(self, thread_id: str) -> str:
        return f"{self.prefix}op:{{{thread_id}}}"

    def uuid(self, thread_id: str) -> str:
        return f"{self.prefix}uuid:{{{thread_id}}}"

    def chain(self, chain: str) -> str:
        return self._chain + chain

    def tmp(self, tmp_id: str) -> str:
        return f"{self.prefix}tmp:{{{tmp_id}}}"

    def index(self) -> str:
        """The SET that lists this prefix's threads and registry chains (see redis_scripts.py)."""
        return self.prefix + INDEX_KEY

    def key(self, space: str, *parts: str) -> str:
        """`{prefix}<space>:<part>:<part>...` for any key space (the pump's streams use this)."""
        if space not in KEY_SPACES:
            raise ValueError(f"unknown key space {space!r} (allowed: {', '.join(sorted(KEY_SPACES))})")
        for p in parts:
            if not isinstance(p, str) or not p:
                raise ValueError(f"key parts must be non-empty strings, got {p!r}")
        return self.prefix + ":".join((space, *parts))

    # -- parsing and patterns ---------------------------------------------------------------------
    def pattern(self, space: str) -> str:
        """SCAN MATCH pattern for every key of `space` under this prefix (and nothing else)."""
        if space not in KEY_SPACES:
            raise ValueError(f"unknown key space {space!r} (allowed: {', '.join(sorted(KEY_SPACES))})")
        return f"{glob_escape(self.prefix)}{space}:*"

    def thread_of(self, key: str) -> str:
        """The thread id of a `{prefix}buffer:{<thread_id>}` key."""
        head = f"{self.prefix}buffer:{{"
        if not (key.startswith(head) and key.endswith("}")):
            raise ValueError(f"{key!r} is not a buffer key of prefix {self.prefix!r}")
        return key[len(head):-1]

    def chain_of(self, key: str) -> str:
        """The call chain of a `{prefix}chain:<chain>` key."""
        if not key.startswith(self._chain):
            raise ValueError(f"{key!r} is not a chain key of prefix {self.prefix!r}")
        return key[len(self._chain):]


class ClusterKeys(RedisKeys):
    """The key layout of the Redis Cluster mode: RedisKeys with a tagged chain key and the index
    split into buckets (module docstring)."""

    __slots__ = ("_buckets",)

    def __init__(self, prefix: str) -> None:
        super().__init__(prefix)
        self._buckets = tuple(f"{prefix}{INDEX_KEY}:{{{prefix}{n}}}" for n in range(CLUSTER_INDEX_BUCKETS))

    def chain(self, chain: str) -> str:
        return f"{self._chain}{{{chain}}}"

    def chain_of(self, key: str) -> str:
        if not (key.startswith(self._chain + "{") and key.endswith("}")):
            raise ValueError(f"{key!r} is not a cluster chain key of prefix {self.prefix!r}")
        return key[len(self._chain) + 1:-1]

    def key(self, space: str, *parts: str) -> str:
        """`{prefix}<space>:{<prefix>}[:<part>...]`: the pump's streams (tasks, results, dlq, ingress,
        egress) and their records share one hash tag per organism, so a MULTI or script over them
        runs on one node."""
        plain = super().key(space, *parts)  # validates space and parts
        head = self.prefix + space
        return f"{head}:{{{self.prefix}}}{plain[len(head):]}"

    def buckets(self) -> tuple[str, ...]:
        """Every index bucket key, in bucket order."""
        return self._buckets

    def bucket(self, entry: str) -> str:
        """The index bucket that holds `entry` ("t:<thread id>" or "c:<chain>")."""
        return self._buckets[zlib.crc32(entry.encode()) % CLUSTER_INDEX_BUCKETS]

    def task_buckets(self, count: int = CLUSTER_TASKS_BUCKETS) -> tuple[tuple[str, str], ...]:
        """(tasks stream, dead-letter stream) of each of `count` task buckets, in bucket order.

        One bucket is the organism's own slot (`key("tasks")`, `key("dlq")`). With more, bucket n
        gets the hash tag `<prefix>t<n>.<k>` with the smallest k whose slot lies in the n-th of
        `count` equal ranges of the slot space: a pure function of the prefix (every process and
        the operator compute the same names), and buckets land on different masters wherever the
        masters own contiguous ranges (as `redis-cli --cluster create` assigns them)."""
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= CLUSTER_SLOTS:
            raise ValueError(f"task bucket count must be an integer from 1 to {CLUSTER_SLOTS}, got {count!r}")
        if count == 1:
            return ((self.key("tasks"), self.key("dlq")),)
        out = []
        for n in range(count):
            low, high = n * CLUSTER_SLOTS // count, (n + 1) * CLUSTER_SLOTS // count
            k = 0
            while not low <= key_slot(f"{self.prefix}t{n}.{k}") < high:
                k += 1
            tag = f"{self.prefix}t{n}.{k}"
            out.append((f"{self.prefix}tasks:{{{tag}}}", f"{self.prefix}dlq:{{{tag}}}"))
        return tuple(out)


def _crc16(data: bytes) -> int:
    """CRC-16/XMODEM, the checksum Redis Cluster maps keys to slots with."""
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
        crc &= 0xFFFF
    return crc


def key_slot(key: str) -> int:
    """The Redis Cluster slot of `key` (hash tag rules: the text between the first '{' and the next
    '}' when not empty, else the whole key)."""
    raw = key.encode()
    start = raw.find(b"{")
    if start >= 0:
        end = raw.find(b"}", start + 1)
        if end > start + 1:
            raw = raw[start + 1:end]
    return _crc16(raw) % CLUSTER_SLOTS
