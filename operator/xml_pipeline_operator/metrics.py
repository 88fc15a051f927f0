"""A few Prometheus counters and gauges, rendered as text at /metrics (no client library needed)."""
from __future__ import annotations

import threading
from collections import Counter


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: Counter[tuple[str, tuple[tuple[str, str], ...]]] = Counter()
        self._phases: dict[str, str] = {}

    def inc(self, name: str, amount: int = 1, **labels: str) -> None:
        with self._lock:
            self._counters[(name, tuple(sorted(labels.items())))] += amount

    def set_phase(self, organism: str, phase: str) -> None:
        with self._lock:
            self._phases[organism] = phase

    def forget_phase(self, organism: str) -> None:
        with self._lock:
            self._phases.pop(organism, None)

    def render(self, api_requests: Counter[tuple[str, str]] | None = None) -> str:
        with self._lock:
            counters = dict(self._counters)
            phases = Counter(self._phases.values())
        lines = ["# HELP xpo_reconciles_total Reconciliation passes by result.",
                 "# TYPE xpo_reconciles_total counter"]
        for (name, labels), value in sorted(counters.items()):
            text = ",".join(f'{k}="{v}"' for k, v in labels)
            lines.append(f"{name}{{{text}}} {value}")
        lines += ["# HELP xpo_organisms Organisms seen by this operator, by phase.", "# TYPE xpo_organisms gauge"]
        for phase, n in sorted(phases.items()):
            lines.append(f'xpo_organisms{{phase="{phase}"}} {n}')
        lines += ["# HELP xpo_api_requests_total Kubernetes API requests made by the reconciler.",
                  "# TYPE xpo_api_requests_total counter"]
        for (verb, kind), n in sorted((api_requests or {}).items()):
            lines.append(f'xpo_api_requests_total{{verb="{verb}",kind="{kind}"}} {n}')
        return "\n".join(lines) + "\n"


#: Process-wide metrics (one operator per process in production).
METRICS = Metrics()
