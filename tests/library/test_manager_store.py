"""The pump's store on the manager backend (memory/manager_store.py): appends group-committed.

Every append issued while the previous batch is on its way leaves with the others in one server
call, in the order the appends claimed their indices: many appends to one thread all land, each
once, at consecutive indices, in a few calls. Each append keeps its own outcome: a full thread fails
only its own appends, and a server that is gone fails every waiting append with BackendUnavailable.
"""
from __future__ import annotations

import asyncio
import secrets
import threading
from collections.abc import Iterator

import pytest

from xml_pipeline.errors import BackendUnavailable, ThreadFullError
from xml_pipeline.memory import BackendConfig, ManagerBackend
from xml_pipeline.memory.async_store import open_store
from xml_pipeline.memory.context_buffer import ContextBuffer, PreparedAppend
from xml_pipeline.memory.manager_store import BATCH_BYTES, ManagerStore

SIGNING_KEY = "manager-store-tests-signing-key-0123456789"


@pytest.fixture
def manager() -> Iterator[ManagerBackend]:
    backend = ManagerBackend(BackendConfig(backend_type="manager", signing_key=SIGNING_KEY))
    yield backend
    backend.close()


def tid() -> str:
    return secrets.token_hex(16)


async def test_concurrent_appends_land_in_order_in_a_few_server_calls(manager: ManagerBackend) -> None:
    store = open_store(manager)
    assert isinstance(store, ManagerStore)
    buffer = ContextBuffer(manager)
    one, other = tid(), tid()
    try:
        jobs = [store.append(buffer, buffer.prepare(one, f"m{i}", "console", "echo", append_id=f"a{i}"),
                             [(f"k{i}", manager.signer.sign(b"input %d" % i))]) for i in range(100)]
        jobs += [store.append(buffer, buffer.prepare(other, f"o{i}", "echo", "console", append_id=f"o{i}"))
                 for i in range(20)]
        slots = await asyncio.gather(*jobs)
    finally:
        store.close()
    assert [s.index for s in slots[:100]] == list(range(100))
    assert [s.index for s in slots[100:]] == list(range(20))
    assert [s.payload for s in buffer.get_thread_slots(one)] == [f"m{i}" for i in range(100)]
    assert [s.payload for s in buffer.get_thread_slots(other)] == [f"o{i}" for i in range(20)]
    # Each append's temp items were stored with it.
    assert manager.temp_get_many(["k0", "k99"]) == [manager.signer.sign(b"input 0"), manager.signer.sign(b"input 99")]
    # All 120 in flight at once: one call took them (a second at most, for a retried index).
    assert store.appends == 120 and store.calls <= 2


async def test_a_repeated_append_id_gives_the_first_slot(manager: ManagerBackend) -> None:
    store = open_store(manager)
    buffer = ContextBuffer(manager)
    thread = tid()
    try:
        first = await store.append(buffer, buffer.prepare(thread, "same", "console", "echo", append_id="x1"))
        again = await store.append(ContextBuffer(manager), buffer.prepare(thread, "same", "console", "echo",
                                                                          append_id="x1"))
    finally:
        store.close()
    assert first.index == again.index == 0 and manager.buffer_thread_len(thread) == 1


async def test_a_full_thread_fails_only_its_own_appends(manager: ManagerBackend) -> None:
    store = open_store(manager)
    buffer = ContextBuffer(manager, max_slots_per_thread=5)
    full, fine = tid(), tid()
    try:
        outcomes = await asyncio.gather(
            *(store.append(buffer, buffer.prepare(full, f"f{i}", "console", "echo", append_id=f"f{i}"),
                           [(f"input-f{i}", manager.signer.sign(b"x"))]) for i in range(8)),
            *(store.append(buffer, buffer.prepare(fine, f"g{i}", "console", "echo", append_id=f"g{i}"))
              for i in range(3)),
            return_exceptions=True)
    finally:
        store.close()
    stored = [o for o in outcomes[:8] if not isinstance(o, BaseException)]
    refused = [o for o in outcomes[:8] if isinstance(o, BaseException)]
    assert len(stored) == 5 and len(refused) == 3
    assert all(isinstance(e, ThreadFullError) and e.thread_id == full and e.limit == 5 for e in refused)
    assert manager.buffer_thread_len(full) == 5 and manager.buffer_thread_len(fine) == 3
    # A refused append stored no inputs.
    assert sum(v is not None for v in manager.temp_get_many([f"input-f{i}" for i in range(8)])) == 5


async def test_a_server_that_is_gone_fails_every_waiting_append(manager: ManagerBackend) -> None:
    store = open_store(manager)
    buffer = ContextBuffer(manager)
    thread = tid()
    try:
        await store.append(buffer, buffer.prepare(thread, "before", "console", "echo", append_id="b0"))
        server = manager._server  # noqa: SLF001 - the test stops the server this backend started
        assert server is not None
        server.kill()
        server.wait(10)
        outcomes = await asyncio.gather(
            *(store.append(buffer, buffer.prepare(thread, f"after{i}", "console", "echo", append_id=f"a{i}"))
              for i in range(10)), return_exceptions=True)
    finally:
        store.close()
    assert all(isinstance(o, BackendUnavailable) for o in outcomes), outcomes


async def test_large_slots_leave_in_calls_of_a_few_mib_in_order(manager: ManagerBackend) -> None:
    store = open_store(manager)
    assert isinstance(store, ManagerStore)
    buffer = ContextBuffer(manager)
    thread = tid()
    big = 3 << 19  # 1.5 MiB: two fit under BATCH_BYTES, a third does not
    assert 2 * big < BATCH_BYTES < 3 * big
    try:
        slots = await asyncio.gather(*(store.append(buffer, buffer.prepare(thread, f"{i}" * big, "console", "echo",
                                                                           append_id=f"b{i}")) for i in range(6)))
    finally:
        store.close()
    assert [s.index for s in slots] == list(range(6))
    assert [s.payload[0] for s in buffer.get_thread_slots(thread)] == [f"{i}" for i in range(6)]
    # Three calls of two slots each, not one call of 9 MiB (a small append joins the others at once:
    # the first test).
    assert store.appends == 6 and store.calls == 3


async def test_slots_are_signed_in_the_io_thread_not_the_event_loop(manager: ManagerBackend,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The HMAC of a large slot must not hold the pump's loop: ManagerStore signs each slot for its
    index in the io thread that sends the batch; what lands verifies where it lies."""
    signed_in: list[str] = []
    real_blob = PreparedAppend.blob

    def blob(self: PreparedAppend, index: int) -> bytes:
        signed_in.append(threading.current_thread().name)
        return real_blob(self, index)

    monkeypatch.setattr(PreparedAppend, "blob", blob)
    store = open_store(manager)
    buffer = ContextBuffer(manager)
    thread = tid()
    try:
        slots = await asyncio.gather(*(store.append(buffer, buffer.prepare(thread, f"p{i}" * 40_000, "console", "echo",
                                                                           append_id=f"s{i}")) for i in range(5)))
    finally:
        store.close()
    assert [s.index for s in slots] == list(range(5))
    loop_thread = threading.current_thread().name
    assert len(signed_in) >= 5 and loop_thread not in signed_in
    assert [s.payload for s in ContextBuffer(manager).get_thread_slots(thread)] == [f"p{i}" * 40_000 for i in range(5)]
