"""RedisIndex: listing, counting and clearing a tenant's threads and registry entries, and the
admin's reindex() and info(), on RedisCore's connections.

Listing and clearing walk the prefix's index SET (`meta:index`, kept by the scripts) with SSCAN;
never KEYS, and not SCAN either: Redis ACLs cannot confine SCAN to a prefix, so a tenant's user is
not granted it. `reindex()` (SCAN, for an admin) rebuilds the index from the keys.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from . import redis_scripts as scripts
from .keys import check_tagged_id
from .redis_core import RedisCore

__all__ = ["RedisIndex", "SCAN_COUNT", "INFO_COUNT_LIMIT"]

log = logging.getLogger(__name__)

#: SSCAN / SCAN COUNT hint: entries examined per round trip while listing, counting or clearing.
SCAN_COUNT = 1000
#: info() stops counting after this many keys per key space (and says so with counts_capped).
INFO_COUNT_LIMIT = 100_000
_BATCH = 500


class RedisIndex(RedisCore):
    """The index walks of a RedisBackend (see the module docstring)."""

    def _scan(self, space: str) -> Iterator[bytes]:
        return self.client.scan_iter(match=self.keys.pattern(space), count=SCAN_COUNT)

    def _index_entries(self, kind: bytes) -> Iterator[list[bytes]]:
        """The index entries of `kind` (b"t" threads, b"c" chains), in batches of up to _BATCH.

        SSCAN returns every entry present for the whole walk at least once (de-duplicated here) and
        may or may not return entries added or removed meanwhile, the same contract as SCAN.
        """
        seen: set[bytes] = set()
        batch: list[bytes] = []
        for entry in self.client.sscan_iter(self._index, match=kind + b":*", count=SCAN_COUNT):
            if entry in seen:
                continue
            seen.add(entry)
            batch.append(entry)
            if len(batch) >= _BATCH:
                yield batch
                batch = []
        if batch:
            yield batch

    def _live(self, kind: bytes, limit: int | None = None) -> Iterator[tuple[str, bytes]]:
        """(id, value) of each live index entry of `kind`: value is the uuid for chains, 1 for
        threads. Dead entries (expired threads and mappings) are dropped from the index on the way."""
        found = 0
        for batch in self._index_entries(kind):
            reply = self._eval(scripts.INDEX_LIVE, (self._index,), (self._prefix, *batch))
            for i in range(0, len(reply), 2):
                entry, value = reply[i], reply[i + 1]
                try:
                    ident = entry[2:].decode()
                    if kind == b"t":
                        check_tagged_id(ident, "thread id")
                    else:
                        value.decode()
                except (UnicodeDecodeError, ValueError, AttributeError):
                    # Not something this library writes (a hand-made or corrupted entry): skipped,
                    # never a crash of every listing.
                    log.warning("prefix %r: skipping index entry %r, which this library never writes",
                                self._prefix, entry[:80])
                    continue
                yield ident, value
                found += 1
            if limit is not None and found >= limit:
                return

    def _clear_index(self, kind: bytes) -> int:
        # Batches are collected first: deleting entries while SSCAN walks the set is allowed but
        # would make the walk's guarantees harder to reason about.
        batches = list(self._index_entries(kind))
        return sum(int(self._eval(scripts.INDEX_CLEAR, (self._index,), (self._prefix, *b))) for b in batches)

    def _count(self, kind: bytes, limit: int = INFO_COUNT_LIMIT) -> tuple[int, bool]:
        n = sum(1 for _ in self._live(kind, limit))
        return min(n, limit), n >= limit

    def reindex(self) -> dict[str, int]:
        """Add every thread and registry chain of this prefix to the index, from a SCAN of the keys.

        For data written before the index existed (or an index deleted by hand). Needs SCAN, so run
        it as a user allowed to (an organism's restricted user is not). Returns the counts added.
        """
        def run() -> dict[str, int]:
            added = {"threads": 0, "chains": 0}
            for space, kind, name in (("buffer", "t", "threads"), ("chain", "c", "chains")):
                batch: list[str] = []
                for raw in self._scan(space):
                    try:
                        key = raw.decode()
                        batch.append(f"{kind}:" + (self.keys.thread_of(key) if kind == "t" else self.keys.chain_of(key)))
                    except (UnicodeDecodeError, ValueError):
                        continue  # not a key of our layout (never written by this library)
                    if len(batch) >= _BATCH:
                        added[name] += int(self.client.sadd(self._index, *batch))
                        batch = []
                if batch:
                    added[name] += int(self.client.sadd(self._index, *batch))
            if self._ttl:
                self.client.expire(self._index, self._ttl)
            return added
        return self._do("reindex", run)

    # -- Monitoring -------------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        server = self._do("info", lambda: self.client.info("server"))
        threads, capped_t = self._do("info", lambda: self._count(b"t"))
        entries, capped_r = self._do("info", lambda: self._count(b"c"))
        return {
            "backend": "redis",
            "url": self._url,
            "prefix": self._prefix,
            "ttl": self._ttl or None,
            "ttl_seconds": self._ttl,
            "buffer_threads": threads,
            "registry_entries": entries,
            "counts_capped": capped_t or capped_r,
            # Valkey reports its own version beside the Redis version it is compatible with.
            "server": str(server.get("server_name") or "redis"),
            "server_version": str(server.get("valkey_version") or server.get("redis_version")),
            "signing": "process-local (no key configured)" if self._signer.local else "configured",
        }
