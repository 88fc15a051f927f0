"""ManagerStore: the pump's AsyncStore on a ManagerBackend, with its appends group-committed.

On the manager backend every operation is a round trip to the server process, and the appends of
one context-buffer thread must reach it one after another (each is signed for the index it lands
at). Made one by one from the io threads, a busy pump pays a thread hop, a pickled request, the
server's dispatch and a reply per append, all of a thread's appends queued behind each other. Here
every append issued while the previous batch is on its way waits for it and then leaves with the
others in ONE server call (`ManagerBackend.buffer_append_many`), in the order the appends claimed
their indices (so a thread's appends all land in that call), from one io thread hop. The slots are
signed for their indices in that io thread, not in the event loop.

Nothing else changes: each append is still the server store's compare-and-append with its append
id and temp items, and comes back as its own outcome or its own exception (a full thread fails only
its append). A failed call (the server gone) fails every append of the batch with the backend's
BackendUnavailable, after the one retry on a fresh connection that buffer_append_at also makes when
every append carries an append id. Takes, deletes and every other call take the io threads as in
ThreadedStore.
"""
from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from .async_store import ThreadedStore
from .manager import ManagerBackend
from .protocol import Appended
from .store_io import IoThreads

if TYPE_CHECKING:
    from .context_buffer import ContextBuffer, PreparedAppend, Temps
    from .slots import BufferSlot

__all__ = ["ManagerStore"]

#: An append waiting for its batch: (thread, prepared slot, index, max_slots, append_id, temp items);
#: the slot is signed for its index in the io thread that sends the batch.
_Unsigned = tuple[str, "PreparedAppend", int, "int | None", "str | None", "list[tuple[str, bytes]]"]
_Pending = tuple[_Unsigned, "asyncio.Future[Appended]"]

#: The slots of one server call add up to at most this many bytes (a larger slot goes alone): the
#: server reads a request into a buffer it keeps (manager_io.KEEP_BUFFER), and a request larger
#: than that is read into fresh memory, page by page. Beyond a few MiB, grouping saves nothing.
BATCH_BYTES = 4 << 20


class ManagerStore(ThreadedStore):
    """ThreadedStore whose appends leave in batches, one batch in flight at a time."""

    def __init__(self, backend: ManagerBackend, io: IoThreads | int = 8) -> None:
        super().__init__(backend, io)
        self.manager = backend
        self._batch: list[_Pending] = []
        self._sending = False
        #: Server calls made for appends, and the appends they carried (tests compare them).
        self.calls = 0
        self.appends = 0

    async def append(self, buffer: ContextBuffer, prepared: PreparedAppend,
                     items: Temps = ()) -> BufferSlot:
        thread, append_id, max_slots = prepared.thread_id, prepared.append_id, buffer.max_slots_per_thread
        first: list[int] = []

        async def send(index: int) -> Appended:
            values = list(items(index) if callable(items) else items)  # values may name the slot's index
            if not first:
                first.append(index)
            fut: asyncio.Future[Appended] = asyncio.get_running_loop().create_future()
            self._batch.append(((thread, prepared, index, max_slots, append_id, values), fut))
            if not self._sending:
                self._sending = True
                # At the end of this loop iteration: the appends of every step that runs in it join.
                fut.get_loop().call_soon(self._send_batch)
            return await fut

        slot = await buffer.store_claimed(prepared, send)
        if callable(items) and first and slot.index != first[0]:
            # A repeat: the slot is the first append's, at another index than the values were made
            # for. Values that name the slot's place are put again (as ContextBuffer.store does).
            await self.io.run(self.manager.temp_put_many, list(items(slot.index)))
        return slot

    def _send_batch(self) -> None:
        waiting = [p for p in self._batch if not p[1].cancelled()]
        size, cut = 0, len(waiting)
        for i, pending in enumerate(waiting):
            size += len(pending[0][1].body)
            if size > BATCH_BYTES and i:
                cut = i
                break
        batch, self._batch = waiting[:cut], waiting[cut:]  # the rest leaves when this call is answered
        if not batch:
            self._sending = False
            return
        self.calls += 1
        self.appends += len(batch)
        call = asyncio.ensure_future(self.io.run(self._append_many, [c for c, _ in batch]))
        call.add_done_callback(lambda done: self._settle(batch, done))

    def _append_many(self, calls: list[_Unsigned]) -> list[Appended | Exception]:
        """In an io thread: sign each slot for its index, then send the batch. The HMAC of a large
        slot (0.7 ms per MiB) and the envelope's copy run here, beside the event loop (hashlib
        releases the GIL on large data), not in it; the order of the batch is the claims' order."""
        return self.manager.buffer_append_many([(thread, prepared.blob(index), index, max_slots, append_id, values)
                                                for thread, prepared, index, max_slots, append_id, values in calls])

    def _settle(self, batch: list[_Pending], done: asyncio.Future[list[Any]]) -> None:
        error = done.exception() if not done.cancelled() else asyncio.CancelledError()
        outcomes: list[Any] = [error] * len(batch) if error is not None else done.result()
        for (_, fut), outcome in zip(batch, outcomes):
            if fut.done():
                continue
            if isinstance(outcome, BaseException):
                fut.set_exception(outcome)
            else:
                fut.set_result(Appended(*outcome))
        self._send_batch()  # the appends that came meanwhile, or nothing more to send
