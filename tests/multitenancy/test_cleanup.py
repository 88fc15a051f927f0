"""cleanup_prefix: removes every key of one prefix, leaves the others, resumes after a crash."""
from __future__ import annotations

import pytest
import redis

from xml_pipeline.errors import ConfigError
from xml_pipeline_operator.tenancy.cleanup import CleanupProgress, cleanup_prefix


def _populate(r: redis.Redis, prefix: str, n: int) -> None:
    pipe = r.pipeline(transaction=False)
    for i in range(n):
        pipe.rpush(f"{prefix}buffer:{{t{i}}}", b"s")
        pipe.set(f"{prefix}chain:c{i}", f"u{i}")
    pipe.xadd(f"{prefix}tasks", {"t": "1"})
    pipe.execute()


def _count(r: redis.Redis, prefix: str) -> int:
    return sum(1 for _ in r.scan_iter(match=f"{prefix}*", count=1000))


class _Crash(Exception):
    pass


@pytest.fixture
def tenants(admin: redis.Redis) -> dict[str, str]:
    # "xp:c.a:" next to "xp:c.ab:" and "xp:c.a.b:": neighbours by name, not by prefix.
    ts = {"a": "xp:c.a:", "ab": "xp:c.ab:", "a.b": "xp:c.a.b:"}
    for p in ts.values():
        _populate(admin, p, 300)
    yield ts
    for p in ts.values():
        keys = list(admin.scan_iter(match=f"{p}*"))
        if keys:
            admin.unlink(*keys)


def test_cleanup_removes_only_its_prefix(admin: redis.Redis, tenants: dict[str, str]) -> None:
    others = {p: _count(admin, p) for k, p in tenants.items() if k != "a"}
    progress = cleanup_prefix(admin, tenants["a"], batch_size=100)
    assert progress.done and progress.deleted == 601
    assert _count(admin, tenants["a"]) == 0
    assert {p: _count(admin, p) for p in others} == others
    # Idempotent: a second run finds nothing and says so.
    again = cleanup_prefix(admin, tenants["a"], batch_size=100)
    assert again.done and again.deleted == 0


def test_cleanup_resumes_after_interruption(admin: redis.Redis, tenants: dict[str, str]) -> None:
    recorded: list[dict[str, object]] = []  # what the operator would keep in the Organism's status

    def persist_then_die(p: CleanupProgress) -> None:
        recorded.append(p.as_dict())
        if len(recorded) == 3:
            raise _Crash

    with pytest.raises(_Crash):
        cleanup_prefix(admin, tenants["a"], batch_size=50, on_batch=persist_then_die)
    left = _count(admin, tenants["a"])
    assert 0 < left < 601  # really interrupted half way
    resumed_from = CleanupProgress.from_dict(recorded[-1])
    assert resumed_from.cursor != 0 and not resumed_from.done
    # A new operator process: bounded calls (as the finalizer makes them) until done.
    progress = resumed_from
    calls = 0
    while not progress.done:
        progress = cleanup_prefix(admin, tenants["a"], start=progress, batch_size=50, max_batches=2)
        calls += 1
    assert calls > 1
    assert _count(admin, tenants["a"]) == 0
    assert progress.deleted == 601  # each key counted once, across the crash
    assert _count(admin, tenants["ab"]) == 601 and _count(admin, tenants["a.b"]) == 601


def test_progress_for_another_prefix_refused(admin: redis.Redis) -> None:
    with pytest.raises(ValueError, match="xp:c.x:"):
        cleanup_prefix(admin, "xp:c.y:", start=CleanupProgress(prefix="xp:c.x:"))


@pytest.mark.parametrize("prefix", ["xp:*", "*", "xp:c.a", ""])
def test_glob_or_bad_prefix_refused(admin: redis.Redis, prefix: str) -> None:
    with pytest.raises(ConfigError):
        cleanup_prefix(admin, prefix)
