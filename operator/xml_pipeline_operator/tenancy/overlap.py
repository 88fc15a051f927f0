"""Overlapping prefixes on one shared Redis: who wins, and the message for the one refused.

Two prefixes overlap when they are equal or one starts the other (`xp:a:` and `xp:a:b:`): the
ACL pattern `~xp:a:*` would then grant the first organism the second one's keys, and a cleanup of
`xp:a:` would delete them. So among overlapping Organisms on the same shared Redis, the one created
first keeps its prefix and every later one is refused (Ready=False) with a message naming it.
"First" is by creation timestamp, then namespace/name, so the verdict is the same whichever order
the operator sees them in, also after a restart.
"""
from __future__ import annotations

from collections.abc import Iterable
from xml_pipeline.contract import Tenant
from xml_pipeline.memory.keys import prefixes_overlap


def find_conflict(candidate: Tenant, others: Iterable[Tenant]) -> Tenant | None:
    """The earliest Organism that overlaps `candidate` and precedes it, or None when it may proceed.

    `others` may include `candidate` itself (same namespace/name), which is ignored.
    """
    best: Tenant | None = None
    for other in others:
        if (other.namespace, other.name) == (candidate.namespace, candidate.name):
            continue
        if other.order >= candidate.order or not prefixes_overlap(candidate.prefix, other.prefix):
            continue
        if best is None or other.order < best.order:
            best = other
    return best


def conflict_message(candidate: Tenant, other: Tenant) -> str:
    """The condition message for a refused Organism; names the Organism that holds the prefix."""
    how = "is the same as" if candidate.prefix == other.prefix else "overlaps"
    return (f"prefix {candidate.prefix!r} {how} prefix {other.prefix!r} of Organism {other.ref} on the "
            f"same shared Redis; choose a prefix that neither starts nor is started by another "
            f"organism's (spec.backend.redis.prefix)")


def find_overlaps(tenants: Iterable[Tenant]) -> dict[str, Tenant]:
    """Every refused tenant (by `ref`) with the Organism it conflicts with. O(n log n).

    Sorting the prefixes puts every prefix right before the ones it starts, so each prefix only
    needs comparing with the chain of prefixes that start it (a stack), not with all others.
    """
    items = sorted(tenants, key=lambda t: (t.prefix, t.order))
    refused: dict[str, Tenant] = {}
    # Stack of tenants whose prefix starts the current one, with the earliest (by order) holder.
    stack: list[Tenant] = []
    groups: list[list[Tenant]] = []
    for t in items:
        while stack and not t.prefix.startswith(stack[-1].prefix):
            stack.pop()
        if stack:
            groups[-1].append(t)
        else:
            groups.append([t])
        stack.append(t)
    # Within a group of overlapping prefixes, decide each one exactly like find_conflict would.
    for group in groups:
        for t in group:
            other = find_conflict(t, group)
            if other is not None:
                refused[t.ref] = other
    return refused
