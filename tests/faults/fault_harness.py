"""Helpers of the fault suite: organism files, counting what each sender got back."""
from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from pump_harness import SIGNING_KEY, organism_yaml

from xml_pipeline.message_bus.message import Message
from xml_pipeline.organism import Organism, load_organism


def write_organism(tmp_path: Path, listeners: str, *, backend: dict[str, Any] | None = None,
                   name: str = "faults", **pool: Any) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(organism_yaml(name=name, backend=backend, listeners=listeners, pool=pool or None))
    return path


def redis_backend(url: str, prefix: str, ttl: int = 300) -> dict[str, Any]:
    return {"type": "redis", "redis_url": url, "redis_prefix": prefix, "redis_ttl": ttl}


def load(path: Path) -> Organism:
    return load_organism(path, environ={"XP_SIGNING_KEY": SIGNING_KEY})


def messages(to: str, n: int, marker: Path, **attrs: Any) -> list[Message]:
    extra = "".join(f' {k}="{v}"' for k, v in attrs.items())
    return [Message(sender="console", to=to, payload=f'<m tag="t{i}" marker="{marker}"{extra}/>') for i in range(n)]


class Tally:
    """What came back for the messages sent: answers and errors per conversation id."""

    def __init__(self, sent: Iterable[Message]) -> None:
        self.sent = [m.id for m in sent]
        self.outputs: list[Message] = []

    def add(self, m: Message) -> None:
        self.outputs.append(m)

    def per_conversation(self) -> Counter[str]:
        return Counter(m.in_reply_to or "" for m in self.outputs)

    @property
    def answered(self) -> int:
        return sum(1 for m in self.outputs if not m.is_error)

    @property
    def errored(self) -> int:
        return sum(1 for m in self.outputs if m.is_error)

    def complete(self) -> bool:
        return set(self.per_conversation()) >= set(self.sent)

    def assert_exactly_one_each(self) -> None:
        """Every conversation got exactly one output (answer or error), none for unknown ids."""
        per = self.per_conversation()
        assert set(per) == set(self.sent), (len(per), len(self.sent))
        assert max(per.values()) == 1, self._repeated(per)
        assert self.answered + self.errored == len(self.sent)

    def assert_one_output_id_each(self) -> int:
        """Every conversation got outputs of exactly one message id (one answer or one error), none
        for unknown ids; an output may be on egress more than once under that one id (a reader saw
        it on a master that died before replicating it, and the re-run wrote it again). Returns how
        many such repeats there were."""
        per = self.per_conversation()
        assert set(per) == set(self.sent), (len(per), len(self.sent))
        by_id: dict[str, set[str]] = {}
        for m in self.outputs:
            by_id.setdefault(m.in_reply_to or "", set()).add(m.id)
            first = next(o for o in self.outputs if o.id == m.id)
            assert (m.kind, m.payload) == (first.kind, first.payload), (m.id, m.payload[:200], first.payload[:200])
        assert max(len(ids) for ids in by_id.values()) == 1, self._repeated(per)
        return len(self.outputs) - len(self.sent)

    def _repeated(self, per: Counter[str]) -> list[tuple[str | None, str, str, str]]:
        return [(m.in_reply_to, m.id, m.kind, m.payload[:200]) for m in self.outputs
                if per[m.in_reply_to or ""] > 1][:6]


def executions(marker: Path) -> Counter[str]:
    """How often each tag ran (lines `<tag> <pid>` written by fault_handlers)."""
    if not marker.exists():
        return Counter()
    return Counter(line.split()[0] for line in marker.read_text().splitlines() if line.strip())


def wait_for(cond: Callable[[], Any], what: str, timeout: float) -> Any:
    """Poll `cond` (a bound against hangs, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.05)
