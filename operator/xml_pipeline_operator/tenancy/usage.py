"""Per-organism usage of a shared Redis (threads, keys, approximate bytes) with bounded work per tick.

Counting keys per prefix with `SCAN MATCH <prefix>*` costs a walk over the *whole* keyspace for
every organism (MATCH filters after the walk), i.e. organisms × all keys per round. Instead one
`UsageSampler` walks the keyspace once per round for all organisms together and attributes each
key to the organism whose prefix starts it (prefixes never overlap on one Redis, see overlap.py).
Each `tick()` does a bounded slice of that walk (`keys_per_tick` keys scanned, at most
`memory_samples_per_tick` MEMORY USAGE calls), so a tick costs the same for 5 or 500 organisms;
a round's figures are published when the walk wraps around. Bytes are an estimate: the mean
MEMORY USAGE of sampled keys (picked round-robin over organisms, so each gets its share) times the
organism's key count.
"""
from __future__ import annotations

import random
import time
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

import redis
from xml_pipeline import contract

#: Key-space name of a thread's buffer right after the prefix: `{prefix}buffer:{<thread_id>}`.
BUFFER_SPACE = contract.BUFFER_SPACE + ":"

# Any hashable tenant id (the operator uses (namespace, name)); a TypeVar because Mapping is
# invariant in its key, so a Mapping[tuple[str, str], str] is not a Mapping[Hashable, str].
_TenantId = TypeVar("_TenantId", bound=Hashable)


@dataclass(frozen=True)
class Usage:
    """One organism's usage as of the last complete round."""

    threads: int
    keys: int
    #: Estimate (mean sampled MEMORY USAGE × keys); 0 when nothing was sampled yet.
    approx_bytes: int
    #: How many keys were sampled with MEMORY USAGE in the round behind `approx_bytes`.
    sampled_keys: int
    #: Unix time at which the round finished.
    measured_at: float

    def as_status(self) -> dict[str, int | str]:
        """The `status.usage` shape of an Organism."""
        return {"threads": self.threads, "keys": self.keys, "approxBytes": self.approx_bytes,
                "sampledKeys": self.sampled_keys,
                "measuredAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.measured_at))}


@dataclass
class TickCost:
    """Work one tick did (the benchmark reports it)."""

    scan_calls: int = 0
    keys_scanned: int = 0
    memory_calls: int = 0
    seconds: float = 0.0
    round_completed: bool = False


@dataclass
class _Acc:
    keys: int = 0
    threads: int = 0
    sample_bytes: int = 0
    samples: int = 0
    #: Up to `reservoir` keys seen this tick, candidates for MEMORY USAGE.
    candidates: list[bytes | str] = field(default_factory=list)
    seen_this_tick: int = 0


class UsageSampler:
    """Round-based usage accounting for many organisms on one Redis. Not thread-safe; one per Redis.

    `tenants` maps an organism id (anything hashable, e.g. "namespace/name") to its prefix; call
    `set_tenants` when organisms come and go (counts of a tenant added mid-round start next round).
    """

    def __init__(self, admin: redis.Redis, *, keys_per_tick: int = 20_000, scan_count: int = 1000,
                 memory_samples_per_tick: int = 64, reservoir: int = 4, seed: int | None = None) -> None:
        if keys_per_tick < 1 or scan_count < 1 or memory_samples_per_tick < 0 or reservoir < 1:
            raise ValueError("keys_per_tick, scan_count and reservoir must be >= 1, memory_samples >= 0")
        self._admin = admin
        self.keys_per_tick = keys_per_tick
        self.scan_count = scan_count
        self.memory_samples_per_tick = memory_samples_per_tick
        self.reservoir = reservoir
        self._rng = random.Random(seed)
        self._by_prefix: dict[str, Hashable] = {}
        self._order: list[Hashable] = []
        self._cursor = 0
        self._round: dict[Hashable, _Acc] = {}
        self._rr = 0  # round-robin position over tenants for memory sampling
        self._last_mean: dict[Hashable, float] = {}
        self.latest: dict[Hashable, Usage] = {}

    def set_tenants(self, tenants: Mapping[_TenantId, str]) -> None:
        self._by_prefix = {prefix: tid for tid, prefix in tenants.items()}
        self._order = [tid for _, tid in sorted(self._by_prefix.items(), key=lambda kv: kv[0])]
        for tid in list(self.latest):
            if tid not in tenants:
                del self.latest[tid]
                self._last_mean.pop(tid, None)
        self._round = {tid: acc for tid, acc in self._round.items() if tid in tenants}

    def _owner(self, text: str) -> tuple[Hashable, int] | None:
        """The tenant owning key `text` and its prefix length. A prefix is segments ending in ':',
        so only the few ':'-terminated heads of the key need looking up."""
        i = text.find(":")
        while i != -1:
            tid = self._by_prefix.get(text[: i + 1])
            if tid is not None:
                return tid, i + 1
            i = text.find(":", i + 1)
        return None

    def tick(self) -> TickCost:
        """Scan up to `keys_per_tick` keys, sample some, and publish a round when the walk wraps."""
        t0 = time.perf_counter()
        cost = TickCost()
        for pending in self._round.values():
            pending.candidates.clear()
            pending.seen_this_tick = 0
        while cost.keys_scanned < self.keys_per_tick:
            cursor, keys = self._admin.scan(cursor=self._cursor, count=self.scan_count)
            cost.scan_calls += 1
            cost.keys_scanned += len(keys)
            for key in keys:
                text = key.decode("utf-8", "replace") if isinstance(key, bytes) else key
                owner = self._owner(text)
                if owner is None:
                    continue
                tid, plen = owner
                acc = self._round.get(tid)
                if acc is None:
                    acc = self._round[tid] = _Acc()
                acc.keys += 1
                if text.startswith(BUFFER_SPACE, plen):
                    acc.threads += 1
                # Reservoir sampling: each key of this tick equally likely to be a candidate.
                acc.seen_this_tick += 1
                if len(acc.candidates) < self.reservoir:
                    acc.candidates.append(key)
                else:
                    j = self._rng.randrange(acc.seen_this_tick)
                    if j < self.reservoir:
                        acc.candidates[j] = key
            self._cursor = int(cursor)
            if self._cursor == 0:
                break
        cost.memory_calls = self._sample_memory()
        if self._cursor == 0:
            self._publish()
            cost.round_completed = True
        cost.seconds = time.perf_counter() - t0
        return cost

    def _sample_memory(self) -> int:
        """MEMORY USAGE on up to `memory_samples_per_tick` candidates, round-robin over tenants.

        Tenants are taken in a fixed order (by prefix) starting after the last one served in the
        previous tick, one candidate each per turn, so with hundreds of tenants and a small budget
        every tenant still gets sampled within a few ticks.
        """
        budget = self.memory_samples_per_tick
        order = [tid for tid in self._order if tid in self._round and self._round[tid].candidates]
        if budget == 0 or not order:
            return 0
        start = self._rr % len(order)
        order = order[start:] + order[:start]
        picks: list[tuple[Hashable, bytes | str]] = []
        depth = 0
        served = 0
        while len(picks) < budget:
            took = False
            for i, tid in enumerate(order):
                cands = self._round[tid].candidates
                if depth < len(cands) and len(picks) < budget:
                    picks.append((tid, cands[depth]))
                    took = True
                    if depth == 0:
                        served = i + 1
            if not took:
                break
            depth += 1
        self._rr = start + served
        pipe = self._admin.pipeline(transaction=False)
        for _, key in picks:
            pipe.memory_usage(key, samples=5)
        for (tid, _), size in zip(picks, pipe.execute(raise_on_error=False)):
            if isinstance(size, int):  # None: the key expired meanwhile
                acc = self._round[tid]
                acc.sample_bytes += size
                acc.samples += 1
        return len(picks)

    def _publish(self) -> None:
        now = time.time()
        latest: dict[Hashable, Usage] = {}
        for tid in set(self._by_prefix.values()):
            acc = self._round.get(tid, _Acc())
            if acc.samples:
                mean = acc.sample_bytes / acc.samples
                self._last_mean[tid] = mean
            else:
                mean = self._last_mean.get(tid, 0.0)
            latest[tid] = Usage(threads=acc.threads, keys=acc.keys, approx_bytes=round(mean * acc.keys),
                                sampled_keys=acc.samples, measured_at=now)
        self.latest = latest
        self._round = {}

    def run_round(self, max_ticks: int = 1_000_000) -> dict[Hashable, Usage]:
        """Tick until a round completes (tests and the benchmark); returns the published usage."""
        for _ in range(max_ticks):
            if self.tick().round_completed:
                return dict(self.latest)
        raise RuntimeError(f"no round completed within {max_ticks} ticks")

