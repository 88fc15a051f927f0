"""Overlapping prefixes: the later Organism is refused with a message naming the earlier one."""
from __future__ import annotations

import random

from xml_pipeline_operator.tenancy.overlap import Tenant, conflict_message, find_conflict, find_overlaps

A = Tenant("team-a", "orders", "xp:shop:", created="2026-01-01T00:00:00Z")


def test_equal_prefix_refused_naming_the_first() -> None:
    b = Tenant("team-b", "billing", "xp:shop:", created="2026-01-02T00:00:00Z")
    assert find_conflict(b, [A, b]) == A
    assert find_conflict(A, [A, b]) is None  # the first one keeps its prefix
    msg = conflict_message(b, A)
    assert "team-a/orders" in msg and "is the same as" in msg and "spec.backend.redis.prefix" in msg


def test_one_prefix_starting_the_other_refused_both_ways() -> None:
    longer = Tenant("team-b", "x", "xp:shop:eu:", created="2026-01-02T00:00:00Z")
    shorter = Tenant("team-c", "y", "xp:", created="2026-01-03T00:00:00Z")
    assert find_conflict(longer, [A, longer, shorter]) == A
    assert find_conflict(shorter, [A, longer, shorter]) == A
    assert "overlaps" in conflict_message(longer, A)


def test_neighbours_do_not_overlap() -> None:
    others = [Tenant("n", "1", "xp:shopping:", created="2025-01-01T00:00:00Z"),
              Tenant("n", "2", "xp:sho:", created="2025-01-01T00:00:00Z"),
              Tenant("n", "3", "xp:shop.eu:", created="2025-01-01T00:00:00Z")]
    assert find_conflict(A, others) is None


def test_tie_on_timestamp_is_broken_by_name() -> None:
    b = Tenant("team-a", "other", "xp:shop:", created=A.created)
    assert find_conflict(b, [A, b]) == A  # "orders" < "other"
    assert find_conflict(A, [A, b]) is None


def test_find_overlaps_agrees_with_pairwise_check() -> None:
    rng = random.Random(7)
    segs = ["a", "b", "ab", "a.b"]
    tenants = []
    for i in range(120):
        prefix = "".join(f"{rng.choice(segs)}:" for _ in range(rng.randint(1, 3)))
        tenants.append(Tenant(f"ns{i % 7}", f"o{i}", prefix, created=f"2026-01-01T00:{rng.randint(0, 59):02d}:00Z"))
    expected = {t.ref: c for t in tenants if (c := find_conflict(t, tenants)) is not None}
    assert find_overlaps(tenants) == expected
    assert expected  # the sample really has overlaps
