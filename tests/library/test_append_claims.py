"""Appends a buffer has in flight on one thread land in one round each: the buffer claims
consecutive indices for them (async, through one ordered connection like the pump's pipe) and
orders its blocking appends per thread, so no slot is refused as "moved" and signed again.
Counted in backend calls, not timed."""
from __future__ import annotations

import asyncio
import threading
from typing import Any

from xml_pipeline.memory import ContextBuffer, InMemoryBackend
from xml_pipeline.memory.protocol import Appended


class CountingBackend(InMemoryBackend):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.moved = 0
        self._count_lock = threading.Lock()

    def buffer_append_at(self, *args: Any, **kwargs: Any) -> Appended:
        outcome = super().buffer_append_at(*args, **kwargs)
        with self._count_lock:
            self.calls += 1
            self.moved += outcome.status == "moved"
        return outcome


def test_concurrent_async_appends_to_one_thread_land_in_one_round_each() -> None:
    backend = CountingBackend()
    buffer = ContextBuffer(backend)

    async def main() -> list[int]:
        async def send_one(i: int) -> int:
            prepared = buffer.prepare("hot", f"m{i}", "console", "greeter", append_id=f"m{i}")

            async def send(index: int, blob: bytes) -> Appended:
                await asyncio.sleep(0)  # every store has claimed its index before the first is sent
                return backend.buffer_append_at("hot", blob, index, append_id=f"m{i}")
            return (await buffer.store_async(prepared, send)).metadata.slot_index
        return list(await asyncio.gather(*(send_one(i) for i in range(50))))

    assert sorted(asyncio.run(main())) == list(range(50))
    assert backend.calls == 50 and backend.moved == 0
    assert [s.payload for s in buffer.get_thread_slots("hot")] == [f"m{i}" for i in range(50)]


def test_concurrent_blocking_appends_to_one_thread_are_not_refused() -> None:
    backend = CountingBackend()
    buffer = ContextBuffer(backend)

    def writer(w: int) -> None:
        for i in range(20):
            buffer.append("hot", f"w{w}-{i}", "console", "greeter")

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    slots = buffer.get_thread_slots("hot")
    assert [s.metadata.slot_index for s in slots] == list(range(160))
    assert backend.calls == 160 and backend.moved == 0


def test_a_thread_longer_than_the_buffer_knows_costs_one_extra_round() -> None:
    backend = CountingBackend()
    other = ContextBuffer(backend)
    for i in range(3):
        other.append("t", i, "a", "b")  # another writer (another process, say)
    buffer = ContextBuffer(backend)
    backend.calls = backend.moved = 0
    assert buffer.append("t", "x", "a", "b").metadata.slot_index == 3
    assert (backend.calls, backend.moved) == (2, 1)
    assert buffer.append("t", "y", "a", "b").metadata.slot_index == 4
    assert (backend.calls, backend.moved) == (3, 1)
