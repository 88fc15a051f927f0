"""Key layout of the Redis backend and the rules that keep tenants apart.

Every key starts with the tenant prefix, then a key-space name. The keys of one thread carry the
thread id as a Redis Cluster hash tag (`{...}`), so they live in one slot:

    {prefix}buffer:{<thread_id>}           LIST of signed slot blobs (index = position)
    {prefix}uuid:{<thread_id>}             STRING: the call chain of that thread (registry reverse map)
    {prefix}op:{<thread_id>}:<append_id>   STRING: index given to an append (idempotent retries)
    {prefix}chain:<chain>                  STRING: the thread uuid of a call chain (registry forward map)
    {prefix}tmp:{<id>}                     STRING: temporary worker data (payloads, responses)

docs/storage.md explains the layout and the guarantees in full.
"""
from __future__ import annotations

import re

from ..errors import ConfigError

#: Names the library uses right after the prefix. A prefix segment may not be one of them: otherwise
#: tenant "a:" scanning "a:buffer:*" would also match tenant "a:buffer:x:"'s keys.
KEY_SPACES: frozenset[str] = frozenset(
    {"buffer", "chain", "uuid", "op", "tmp", "tasks", "results", "dlq", "ingress", "egress", "meta"}
)

_SEGMENT = r"[A-Za-z0-9_.-]+"
_PREFIX_RE = re.compile(rf"^(?:{_SEGMENT}:)+$")
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
