"""Concurrency: slot indices and chain uuids are assigned atomically, across real processes.

Two kinds of test:
- real processes (spawn and forkserver) hammering one thread and one chain, and
- a deterministic demonstration that the checks catch the naive design: threads held at a gate
  between "read the length" and "append" (or between "get" and "set") always collide there, so
  the same check that passes for ContextBuffer / ThreadRegistry fails for the naive versions.
"""
from __future__ import annotations

import multiprocessing
import pickle
import threading
import uuid as uuid_module
from collections.abc import Callable
from typing import Any

import library_workers
import pytest

from xml_pipeline.errors import SlotIntegrityError
from xml_pipeline.memory import BufferSlot, ContextBuffer, SharedBackend, SlotMetadata
from xml_pipeline.message_bus.thread_registry import ThreadRegistry

PROCESSES = 8
APPENDS = 500

MakeBackend = Callable[..., SharedBackend]


def check_log(buffer: ContextBuffer, thread_id: str, given: dict[Any, int]) -> None:
    """`given` maps each appended payload to the index its append returned. Correct means: the
    indices are exactly 0..n-1, each payload sits at the index it was given, and every slot read
    back carries its position as slot_index."""
    slots = buffer.get_thread_slots(thread_id)
    assert sorted(given.values()) == list(range(len(given))), "indices are not exactly 0..n-1"
    assert len(slots) == len(given)
    for position, slot in enumerate(slots):
        assert slot.metadata.slot_index == position
        assert given[slot.payload] == position, f"{slot.payload} was told index {given[slot.payload]}, stored at {position}"


# -- real processes ---------------------------------------------------------------------------------


# (8 processes on Redis: tests/library/test_redis_concurrency.py)
@pytest.mark.parametrize("kind, method", [("manager", "spawn"), ("manager", "forkserver")])
def test_eight_processes_share_one_thread_and_one_chain(make_backend: MakeBackend, kind: str, method: str) -> None:
    backend = make_backend(kind, redis_ttl=600)
    ctx = multiprocessing.get_context(method)
    barrier, results = ctx.Barrier(PROCESSES), ctx.Queue()
    thread_id, chain = f"hot-{uuid_module.uuid4().hex[:8]}", "console.router.greeter"
    procs = [ctx.Process(target=library_workers.append_and_claim,
                         args=(backend, thread_id, chain, APPENDS, barrier, results))
             for _ in range(PROCESSES)]
    for p in procs:
        p.start()
    reports = [results.get(timeout=90) for _ in procs]
    for p in procs:
        p.join(30)
    assert [r for r in reports if r[0] != "ok"] == []

    given = {(pid, i): index for _, pid, _, indices, _ in reports for i, index in enumerate(indices)}
    assert len(given) == PROCESSES * APPENDS
    for _, _, _, indices, _ in reports:
        assert indices == sorted(indices)  # each process saw its own appends in order
    check_log(ContextBuffer(backend), thread_id, given)
    assert sorted(given.values()) == list(range(PROCESSES * APPENDS))

    claimed = {r[2] for r in reports}
    assert len(claimed) == 1, f"{len(claimed)} uuids for one chain"
    (winner,) = claimed
    assert backend.registry_get_uuid(chain) == winner and backend.registry_get_chain(winner) == chain
    assert backend.registry_list_all() == {winner: chain}
    # every child verified with the parent's key ring (the manager handed it over)
    assert {r[4] for r in reports} == {backend.signer.keys}


# -- the naive designs fail the same checks -------------------------------------------------------


class NaiveContextBuffer(ContextBuffer):
    """xml-pipeline's original shared append: read the thread's length, then append. `gate` runs
    in between (a test hook that lets every writer read before anyone writes)."""

    def __init__(self, backend: SharedBackend, gate: Callable[[], None]) -> None:
        super().__init__(backend)
        self.gate = gate

    def append(self, thread_id: str, payload: Any, from_id: str, to_id: str,  # type: ignore[override]
               *args: Any, **kwargs: Any) -> BufferSlot:
        index = self.backend.buffer_thread_len(thread_id)
        self.gate()
        slot = BufferSlot(payload, SlotMetadata(thread_id, from_id, to_id, index, "now", type(payload).__name__))
        place = self.backend.signer.place(self.backend.slot_namespace, thread_id)
        self.backend.buffer_append(thread_id, place.sign(index, b"", pickle.dumps(slot)))  # signed for its guess
        return slot


class GatedContextBuffer(ContextBuffer):
    """The real ContextBuffer with the same gate right before its (atomic) append."""

    def __init__(self, backend: SharedBackend, gate: Callable[[], None]) -> None:
        super().__init__(backend)
        self.gate = gate

    def append(self, *args: Any, **kwargs: Any) -> BufferSlot:  # type: ignore[override]
        self.gate()
        return super().append(*args, **kwargs)


def run_gated_appends(buffer_class: type[ContextBuffer], backend: SharedBackend, writers: int = 8) -> None:
    barrier = threading.Barrier(writers)
    buffer = buffer_class(backend, lambda: barrier.wait(30))  # type: ignore[call-arg]
    given: dict[Any, int] = {}

    def write(n: int) -> None:
        given[("writer", n)] = buffer.append("contended", ("writer", n), "w", "sink").index

    threads = [threading.Thread(target=write, args=(n,)) for n in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    check_log(ContextBuffer(backend), "contended", given)


@pytest.mark.parametrize("kind", ["memory", "manager"])
def test_check_catches_read_length_then_append(make_backend: MakeBackend, kind: str) -> None:
    # Every naive writer signed its slot for the index it read (0): the slots that landed elsewhere
    # fail their signature at the position they are at.
    with pytest.raises(SlotIntegrityError, match="'contended' slot 1: "):
        run_gated_appends(NaiveContextBuffer, make_backend(kind))
    run_gated_appends(GatedContextBuffer, make_backend(kind))  # same gate, atomic append: correct


class NaiveRegistry(ThreadRegistry):
    """The original shared get_or_create: get, and if missing, set a new uuid."""

    def __init__(self, backend: SharedBackend, gate: Callable[[], None]) -> None:
        super().__init__(backend)
        self.gate = gate

    def get_or_create(self, chain: str) -> str:
        existing = self.backend.registry_get_uuid(chain)
        self.gate()
        if existing:
            return existing
        new = str(uuid_module.uuid4())
        self.backend.registry_set(chain, new)
        return new


class GatedRegistry(ThreadRegistry):
    def __init__(self, backend: SharedBackend, gate: Callable[[], None]) -> None:
        super().__init__(backend)
        self.gate = gate

    def get_or_create(self, chain: str) -> str:
        self.gate()
        return super().get_or_create(chain)


def claimed_uuids(registry_class: type[ThreadRegistry], backend: SharedBackend, callers: int = 8) -> set[str]:
    barrier = threading.Barrier(callers)
    registry = registry_class(backend, lambda: barrier.wait(30))  # type: ignore[call-arg]
    got: list[str] = []
    threads = [threading.Thread(target=lambda: got.append(registry.get_or_create("console.greeter")))
               for _ in range(callers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return set(got)


@pytest.mark.parametrize("kind", ["memory", "manager"])
def test_check_catches_get_then_set(make_backend: MakeBackend, kind: str) -> None:
    assert len(claimed_uuids(NaiveRegistry, make_backend(kind))) == 8  # everyone made their own
    backend = make_backend(kind)
    (winner,) = claimed_uuids(GatedRegistry, backend)
    assert backend.registry_list_all() == {winner: "console.greeter"}


def test_max_slots_holds_under_concurrency(make_backend: MakeBackend) -> None:
    backend = make_backend("manager")
    buffer = ContextBuffer(backend, max_slots_per_thread=50)
    outcomes: list[str] = []
    barrier = threading.Barrier(8)

    def write() -> None:
        barrier.wait(30)
        for _ in range(20):
            try:
                buffer.append("bounded", b"x", "w", "sink")
                outcomes.append("stored")
            except Exception as e:  # ThreadFullError
                outcomes.append(type(e).__name__)

    threads = [threading.Thread(target=write) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert outcomes.count("stored") == 50 and outcomes.count("ThreadFullError") == 110
    assert backend.buffer_thread_len("bounded") == 50


def test_forked_child_uses_its_own_connection(make_backend: MakeBackend) -> None:
    backend = make_backend("manager")
    backend.registry_set("c.parent", "p-uuid")
    assert backend.buffer_append("forked", b"from parent") == 0  # the parent's connection is open
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    child = ctx.Process(target=library_workers.use_inherited, args=(backend, results))
    child.start()
    assert results.get(timeout=30) == ("ok", 1, "p-uuid")
    child.join(10)
    assert backend.buffer_append("forked", b"parent again") == 2  # parent's socket was not disturbed
