"""Many processes on one Redis thread: indices are positions, get_or_create has one winner.

Real processes (spawn and forkserver), released together by a gate in Redis itself (BLPOP), each with its own
RedisBackend. The naive "read the length, then append" gives two writers the same index here; the
compare-and-append that signs each slot for its index gives every writer a verified slot.
"""
from __future__ import annotations

import multiprocessing
import secrets
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor

import pytest
import redis
from redis_server import RedisServer

from xml_pipeline.memory.config import BackendConfig
from xml_pipeline.memory.context_buffer import ContextBuffer
from xml_pipeline.memory.redis_backend import RedisBackend

KEY = "test-signing-key-0123456789abcdef"
PROCS = 8
APPENDS = 500
CHAINS = 50


def _backend(url: str, prefix: str) -> RedisBackend:
    return RedisBackend(BackendConfig(backend_type="redis", redis_url=url, redis_prefix=prefix, signing_key=KEY))


def _wait_at_gate(url: str, gate: str) -> None:
    client = redis.Redis.from_url(url)
    client.incr(gate + ":ready")
    client.blpop([gate], timeout=60)
    client.close()


def append_worker(url: str, prefix: str, gate: str, worker: int) -> list[tuple[int, int, int]]:
    backend = _backend(url, prefix)
    buffer = ContextBuffer(backend)
    _wait_at_gate(url, gate)
    out = []
    for i in range(APPENDS):
        slot = buffer.append("shared", (worker, i), from_id=f"w{worker}", to_id="sink")
        out.append((slot.metadata.slot_index, worker, i))
    backend.close()
    return out


def get_or_create_worker(url: str, prefix: str, gate: str, worker: int) -> list[str]:
    backend = _backend(url, prefix)
    _wait_at_gate(url, gate)
    winners = [backend.registry_get_or_create(f"race.chain{c}", f"u{c}-w{worker}") for c in range(CHAINS)]
    backend.close()
    return winners


@pytest.fixture(scope="module", params=["spawn", "forkserver"])
def pool(request: pytest.FixtureRequest) -> Iterator[ProcessPoolExecutor]:
    with ProcessPoolExecutor(PROCS, mp_context=multiprocessing.get_context(request.param)) as executor:
        yield executor


def run_together(pool: ProcessPoolExecutor, server: RedisServer, prefix: str, fn: object) -> list[object]:
    gate = f"{prefix}meta:gate"
    futures = [pool.submit(fn, server.url, prefix, gate, w) for w in range(PROCS)]  # type: ignore[arg-type]
    client = server.client()
    while int(client.get(gate + ":ready") or 0) < PROCS:  # sequencing: every worker is at the gate
        if any(f.done() for f in futures):
            [f.result() for f in futures if f.done()]  # surface a worker's exception
        time.sleep(0.02)
    client.rpush(gate, *[b"go"] * PROCS)
    results = [f.result(timeout=120) for f in futures]
    client.delete(gate, gate + ":ready")
    client.close()
    return results


def test_8_processes_x_500_appends_give_positions_0_to_3999(pool: ProcessPoolExecutor,
                                                            redis_server: RedisServer) -> None:
    prefix = f"conc{secrets.token_hex(4)}:"
    results = run_together(pool, redis_server, prefix, append_worker)
    given = [entry for r in results for entry in r]  # type: ignore[attr-defined]
    assert sorted(index for index, _, _ in given) == list(range(PROCS * APPENDS))
    backend = _backend(redis_server.url, prefix)
    try:
        slots = ContextBuffer(backend).get_thread_slots("shared")
        assert len(slots) == PROCS * APPENDS
        by_index = {index: (w, i) for index, w, i in given}
        for position, slot in enumerate(slots):
            assert slot.metadata.slot_index == position
            assert slot.payload == by_index[position]  # the slot each writer was told it stored there
        # Each writer's own appends keep their order in the log.
        for w in range(PROCS):
            mine = [s.payload[1] for s in slots if s.payload[0] == w]
            assert mine == list(range(APPENDS))
    finally:
        backend.buffer_clear()
        backend.close()


def test_get_or_create_from_8_processes_yields_one_uuid(pool: ProcessPoolExecutor,
                                                        redis_server: RedisServer) -> None:
    prefix = f"race{secrets.token_hex(4)}:"
    results = run_together(pool, redis_server, prefix, get_or_create_worker)
    backend = _backend(redis_server.url, prefix)
    try:
        mappings = backend.registry_list_all()
        assert len(mappings) == CHAINS
        for c in range(CHAINS):
            answers = {r[c] for r in results}  # type: ignore[index]
            assert len(answers) == 1, f"chain {c}: processes disagree: {answers}"
            winner = answers.pop()
            assert mappings[winner] == f"race.chain{c}"
            assert backend.registry_get_chain(winner) == f"race.chain{c}"
            for w in range(PROCS):  # the losers left no reverse entry behind
                if f"u{c}-w{w}" != winner:
                    assert backend.registry_get_chain(f"u{c}-w{w}") is None
    finally:
        backend.registry_clear()
        backend.close()
