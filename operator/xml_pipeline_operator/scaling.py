"""Typed autoscaling and disruption-budget settings of an Organism (parsing and validation).

spec.workers.autoscaling   {minReplicas, maxReplicas, tasksPerReplica, cooldownSeconds, pollingSeconds}
spec.workers.disruptionBudget / spec.pump.disruptionBudget   {enabled, maxUnavailable}

A disruption budget is always expressed as maxUnavailable >= 1 (or a percentage > 0%), never as
minAvailable: a budget that allows no eviction blocks node drains. Pods that are not ready may always
be evicted (unhealthyPodEvictionPolicy AlwaysAllow), so a crash-looping pod never blocks a drain either.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from .podshape import ShapeError, as_mapping, only_known

MAX_REPLICAS = 100
_PERCENT = re.compile(r"^([1-9][0-9]?|100)%$")


@dataclass(frozen=True)
class Autoscaling:
    min_replicas: int = 1
    max_replicas: int = 10
    #: KEDA: target of unfinished tasks (tasks-stream length) per worker pod.
    tasks_per_replica: int = 5
    #: KEDA cooldownPeriod (seconds idle before scaling to zero); HPA scale-down stabilization window.
    cooldown_seconds: int = 300
    #: KEDA pollingInterval.
    polling_seconds: int = 15


@dataclass(frozen=True)
class DisruptionBudget:
    enabled: bool = True
    max_unavailable: int | str = 1


def parse_autoscaling(raw: Any, path: str) -> Autoscaling | None:
    if raw is None:
        return None
    a = as_mapping(raw, path)
    only_known(a, path, ("minReplicas", "maxReplicas", "tasksPerReplica", "cooldownSeconds", "pollingSeconds"),
               "is not a known field")
    low = _int(a.get("minReplicas", 1), f"{path}.minReplicas", 0, MAX_REPLICAS)
    high = _int(a.get("maxReplicas", 10), f"{path}.maxReplicas", 1, MAX_REPLICAS)
    if low > high:
        raise ShapeError(f"{path}.minReplicas", f"{low} is above maxReplicas ({high})", f"0..{high}")
    return Autoscaling(min_replicas=low, max_replicas=high,
                       tasks_per_replica=_int(a.get("tasksPerReplica", 5), f"{path}.tasksPerReplica", 1, 10_000),
                       cooldown_seconds=_int(a.get("cooldownSeconds", 300), f"{path}.cooldownSeconds", 0, 3600),
                       polling_seconds=_int(a.get("pollingSeconds", 15), f"{path}.pollingSeconds", 1, 600))


def parse_budget(raw: Any, path: str) -> DisruptionBudget:
    if raw is None:
        return DisruptionBudget()
    b = as_mapping(raw, path)
    only_known(b, path, ("enabled", "maxUnavailable"), "is not a known field")
    enabled = b.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ShapeError(f"{path}.enabled", f"must be a boolean, got {enabled!r}", "true, false")
    mu = b.get("maxUnavailable", 1)
    if isinstance(mu, bool) or not (isinstance(mu, int) and 1 <= mu <= MAX_REPLICAS
                                    or isinstance(mu, str) and _PERCENT.match(mu)):
        raise ShapeError(f"{path}.maxUnavailable", f"{mu!r} would block evictions or is not a count",
                         f"1..{MAX_REPLICAS} or a percentage 1%..100% (0 would block node drains)")
    return DisruptionBudget(enabled=enabled, max_unavailable=mu)


def _int(value: Any, path: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ShapeError(path, f"must be an integer, got {value!r}", f"{low}..{high}")
    if not low <= value <= high:
        raise ShapeError(path, f"{value} is out of range", f"{low}..{high}")
    return value
