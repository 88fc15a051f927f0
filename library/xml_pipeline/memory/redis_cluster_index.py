"""The index of a RedisClusterBackend: CLUSTER_INDEX_BUCKETS SETs in slots of their own, and the
expiry refreshes of keys that live in other slots than their thread (docs/storage.md, "Redis
Cluster mode").

- entries are `t:<thread id>` and `c:<chain>` as on one server; an entry lives in bucket
  crc32(entry) mod N (keys.ClusterKeys.bucket);
- listing checks every entry against its key on that key's node (one pipeline per batch, which
  redis-py splits by node), removes the dead ones and puts an entry back if its key appeared
  meanwhile (a thread re-created while it was being listed);
- the buckets and chain keys are given ttl + ttl/8 and refreshed at most every ttl/8 per key and
  process (`due`), so they outlive the threads they belong to without a second round trip per append.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from . import redis_cluster_scripts as cs
from .keys import ClusterKeys, check_tagged_id
from .redis_index import SCAN_COUNT

if TYPE_CHECKING:
    from .redis_cluster import RedisClusterBackend

__all__ = ["ClusterIndex"]

log = logging.getLogger(__name__)

#: Entries listed, checked or cleared per round trip.
_BATCH = 500


class ClusterIndex:
    """The bucket SETs of one RedisClusterBackend (thread-safe, as the backend is)."""

    def __init__(self, backend: "RedisClusterBackend") -> None:
        self._backend = backend
        self.keys: ClusterKeys = backend.keys
        self._ttl = backend.ttl
        self._slack_ms = self._ttl * 1000 + self._ttl * 125
        self._refresh_every = self._ttl / 8
        self._refreshed: dict[str, float] = {}
        self._refresh_lock = threading.Lock()

    def due(self, key: str) -> bool:
        """True when `key` (a chain key or bucket) was not refreshed by this process for ttl/8."""
        now = time.monotonic()
        with self._refresh_lock:
            last = self._refreshed.get(key)
            if last is not None and now - last < self._refresh_every:
                return False
            if len(self._refreshed) > 8192:
                self._refreshed.clear()
            self._refreshed[key] = now
            return True

    def add(self, entry: str, out: list[tuple[Any, ...]]) -> None:
        bucket = self.keys.bucket(entry)
        out.append(("SADD", bucket, entry))
        if self._ttl:
            out.append(("PEXPIRE", bucket, self._slack_ms))
            with self._refresh_lock:
                self._refreshed[bucket] = time.monotonic()

    def touch(self, entry: str, out: list[tuple[Any, ...]]) -> None:
        """Refresh the expiry of `entry`'s bucket when this process has not for ttl/8."""
        bucket = self.keys.bucket(entry)
        if self._ttl and self.due(bucket):
            out.append(("PEXPIRE", bucket, self._slack_ms))


    def entries(self, kind: bytes) -> Iterator[tuple[str, list[bytes]]]:
        for bucket in self.keys.buckets():
            seen: set[bytes] = set()
            batch: list[bytes] = []
            for entry in self._backend.client.sscan_iter(bucket, match=kind + b":*", count=SCAN_COUNT):
                if entry in seen:
                    continue
                seen.add(entry)
                batch.append(entry)
                if len(batch) >= _BATCH:
                    yield bucket, batch
                    batch = []
            if batch:
                yield bucket, batch

    def entry_key(self, entry: bytes) -> str:
        ident = entry[2:].decode()
        return self.keys.buffer(ident) if entry[:2] == b"t:" else self.keys.chain(ident)

    def live(self, kind: bytes, limit: int | None = None) -> Iterator[tuple[str, bytes]]:
        """(id, value) of each live entry of `kind` (value: the uuid of a chain, 1 for a thread); dead
        entries are removed, and put back if their key appeared meanwhile."""
        found = 0
        for bucket, batch in self.entries(kind):
            good: list[tuple[bytes, str]] = []
            for entry in batch:
                try:
                    ident = entry[2:].decode()
                    if kind == b"t":
                        check_tagged_id(ident, "thread id")
                    good.append((entry, self.entry_key(entry)))
                except (UnicodeDecodeError, ValueError):
                    log.warning("prefix %r: skipping index entry %r, which this library never writes",
                                self._backend.prefix, entry[:80])
            pipe = self._backend.client.pipeline()
            for _, key in good:
                if kind == b"t":
                    pipe.exists(key)
                else:
                    pipe.get(key)
            values = pipe.execute()
            dead = [entry for (entry, _), v in zip(good, values) if not v]
            if dead:
                self._backend.client.srem(bucket, *dead)
                pipe = self._backend.client.pipeline()
                for entry in dead:
                    pipe.exists(self.entry_key(entry))
                back = [entry for entry, again in zip(dead, pipe.execute()) if again]
                if back:
                    self._backend.client.sadd(bucket, *back)
            for (entry, _), v in zip(good, values):
                if v:
                    yield entry[2:].decode(), (v if kind == b"c" else b"1")
                    found += 1
            if limit is not None and found >= limit:
                return

    def clear(self, kind: bytes) -> int:
        removed = 0
        for bucket, batch in list(self.entries(kind)):
            for entry in batch:
                ident = entry[2:].decode(errors="replace")
                if kind == b"t":
                    removed += min(int(self._backend.client.unlink(self.keys.buffer(ident), self.keys.op(ident))), 1)
                else:
                    uuid = self._backend.client.get(self.keys.chain(ident))
                    if uuid is not None:
                        self._backend.run_script(cs.C_DEL_IF, (self.keys.uuid(uuid.decode()),), (ident,))
                        removed += int(self._backend.client.unlink(self.keys.chain(ident)))
            self._backend.client.srem(bucket, *batch)
        return removed

    def reindex(self) -> dict[str, int]:
        """Add every thread and chain of this prefix to the buckets, from a SCAN of every master."""
        b = self._backend
        added = {"threads": 0, "chains": 0}
        for space, kind, name in (("buffer", "t", "threads"), ("chain", "c", "chains")):
            for raw in b.client.scan_iter(match=self.keys.pattern(space), count=SCAN_COUNT):
                try:
                    key = raw.decode()
                    ident = self.keys.thread_of(key) if kind == "t" else self.keys.chain_of(key)
                except (UnicodeDecodeError, ValueError):
                    continue  # not a key of our layout (never written by this library)
                entry = f"{kind}:{ident}"
                added[name] += int(b.client.sadd(self.keys.bucket(entry), entry))
        if self._ttl:
            for bucket in self.keys.buckets():
                b.client.pexpire(bucket, self._slack_ms)
        return added
