"""ContextBuffer: thread-scoped, append-only message history on top of a SharedBackend.

Same shape as xml-pipeline's: `append(thread_id, payload, from_id, to_id, ...)` returns a frozen
BufferSlot; `get_thread`, `get_thread_slots`, `thread_exists`, `delete_thread`, `get_stats`.

What is different, and why:
- A slot's index is assigned by the backend in the same atomic step that stores it (never "read
  the length, then append", which hands two concurrent writers the same index). The stored blob
  carries slot_index = -1; every slot this class returns has `metadata.slot_index` = its position.
- The per-thread limit is checked by the backend in that same step (`max_slots`), so it holds with
  many processes appending at once; a full thread raises ThreadFullError and stores nothing.
- Slots are signed with the backend's key ring and verified before unpickling, and the signature
  binds each slot to its place: the backend's namespace (Redis prefix), the thread and the index
  (signing.SlotPlace). A slot copied to another thread or prefix, replayed at a later position or
  swapped with another reads as SlotIntegrityError naming the thread and index. To sign for the
  index before the backend assigns it, an append is a compare-and-append: the slot is signed for the
  index this buffer claims for it (the thread's length as last seen plus the appends it has in
  flight there, kept per thread in a bounded LRU; 0 for a thread it never saw), the backend stores
  it only if the thread holds exactly that many slots, and otherwise answers the real length, for
  which the slot is signed again. Each such retry means another writer's slot was stored, so every
  round makes progress for someone; the buffer's own concurrent appends to one thread land in one
  round each (`_claim`, and one blocking append per thread at a time).
- An append id identifies one append of one slot: a repeat (a retry) returns the first slot; the
  same id with a different slot raises AppendIdConflict and stores nothing (see `_repeat`).

`is_shared` and `get_stats()["backend"]` say what xml-pipeline's say: whether a backend was given
("shared") or the buffer keeps its history in this process ("local"). Whether other processes can
see the backend is `backend.is_shared`.
"""
from __future__ import annotations

import collections
import pickle
import threading
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timezone
from typing import Any, cast

from ..errors import AppendIdConflict, BackendError, BackendUnavailable, SlotIntegrityError
from .handler_metadata import HandlerMetadata, slot_to_handler_metadata
from .inmemory import InMemoryBackend, check_thread_id
from .protocol import Appended, SharedBackend
from .serialization import unpickle
from .signing import MAX_APPEND_ID, SlotPlace
from .slots import UNASSIGNED, BufferSlot, SlotMetadata, make_slot
from .thread_context import ThreadContext

__all__ = ["ContextBuffer", "ThreadContext", "BufferSlot", "SlotMetadata", "HandlerMetadata",
           "get_context_buffer", "reset_context_buffer", "slot_to_handler_metadata"]

DEFAULT_MAX_SLOTS_PER_THREAD = 10_000
DEFAULT_MAX_THREADS = 1_000
#: Compare-and-append rounds before giving up. A round fails only because another writer's slot
#: was stored meanwhile, so this is only reached under extreme contention on one thread.
MAX_APPEND_ATTEMPTS = 1000
#: Threads whose next index (and signing place) a buffer remembers; the least recently used are
#: forgotten (a forgotten thread costs one extra round trip on its next append).
EXPECTED_INDEX_CACHE = 4096
#: Locks that order the blocking appends of one thread within a buffer (threads hash onto them).
APPEND_LOCK_STRIPES = 64


#: A pickled slot longer than this is kept once, inside its signed envelope, not also on its own.
SHARED_BODY_MIN = 64 * 1024

#: Temp values to store with an append: (key, signed value) pairs, or a function of the index the
#: slot is signed for that returns them (a value that refers to the slot by its place).
Temps = Sequence[tuple[str, bytes]] | Callable[[int], Sequence[tuple[str, bytes]]]


class PreparedAppend:
    """A slot ready to be stored: pickled once, signed for whichever index the thread is at."""

    __slots__ = ("thread_id", "slot", "body", "append_id", "_aid", "_place", "_signed")

    def __init__(self, slot: BufferSlot, body: bytes, append_id: str | None, place: SlotPlace) -> None:
        self.thread_id = slot.metadata.thread_id
        self.slot = slot
        #: The pickled slot: bytes, or for a large one, once signed, a view of the envelope's body.
        self.body: bytes | memoryview = body
        self.append_id = append_id
        self._aid = append_id.encode() if append_id else b""
        self._place = place
        self._signed: tuple[int, bytes] | None = None

    def blob(self, index: int) -> bytes:
        """The signed envelope of this slot at `index` of its thread."""
        signed = self._signed
        if signed is None or signed[0] != index:
            body = self.body
            blob = self._place.sign(index, self._aid, body)
            if len(body) >= SHARED_BODY_MIN:
                # The envelope holds the body: one copy of a large slot stays alive while the append
                # is in flight, not two (a pump with many 1 MiB messages in flight touches half the
                # fresh memory, and page faults were most of the cost of a large append).
                self.body = memoryview(blob)[len(blob) - len(body):]
            signed = self._signed = (index, blob)
        return signed[1]


class ContextBuffer:
    """The context buffer of an organism: one append-only log of slots per thread.

    (A little over 500 lines, the module: the append's claim, sign and settle steps are shared by
    the blocking, async and batched stores, and live beside the reads they keep consistent.)"""

    def __init__(self, backend: SharedBackend | None = None, *,
                 max_slots_per_thread: int = DEFAULT_MAX_SLOTS_PER_THREAD,
                 max_threads: int = DEFAULT_MAX_THREADS) -> None:
        """`backend=None` keeps the history in this process (a private InMemoryBackend).

        `max_threads` applies to such a local buffer only: a new thread beyond it evicts the oldest
        (xml-pipeline's rule). On a backend, threads end by TTL or delete_thread instead.
        """
        for name, value in (("max_slots_per_thread", max_slots_per_thread), ("max_threads", max_threads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        self._shared = backend is not None
        self._backend: SharedBackend = backend if backend is not None else InMemoryBackend()
        self.max_slots_per_thread = max_slots_per_thread
        self.max_threads = max_threads
        self._lock = threading.Lock()
        # Local buffers: thread ids oldest first (max_threads eviction). Live views handed out by
        # get_or_create_thread, so asking twice gives the same object.
        self._order: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._views: collections.OrderedDict[str, ThreadContext] = collections.OrderedDict()
        # thread id -> [expected next index, SlotPlace]
        self._threads: collections.OrderedDict[str, list[Any]] = collections.OrderedDict()
        self._cache_lock = threading.Lock()
        self._append_locks = tuple(threading.Lock() for _ in range(APPEND_LOCK_STRIPES))
        self._namespace: str = getattr(self._backend, "slot_namespace", "")

    @property
    def backend(self) -> SharedBackend:
        return self._backend

    @property
    def is_shared(self) -> bool:
        """True when the buffer was given a backend (xml-pipeline's "shared mode"), False for a
        buffer that keeps its history in this process. `backend.is_shared` tells whether other
        processes see the backend."""
        return self._shared

    def get_or_create_thread(self, thread_id: str) -> ThreadContext:
        """A live view of `thread_id` (the same object for the same id): reads go to the backend,
        `append` stores through this buffer. The thread itself exists once something is appended."""
        with self._lock:
            view = self._views.get(thread_id)
            if view is None:
                view = self._views[thread_id] = ThreadContext(thread_id, buffer=self)
                while len(self._views) > self.max_threads:  # views are cheap, but not unbounded
                    self._views.popitem(last=False)
            return view

    def _admit(self, thread_id: str) -> None:
        """Local buffers: make room for a new thread by evicting the oldest beyond max_threads."""
        check_thread_id(thread_id)  # a bad id must not cost another thread its place
        with self._lock:
            if thread_id in self._order:
                return
            if len(self._order) >= self.max_threads:
                for known in list(self._order):  # forget threads that expired meanwhile
                    if not self._backend.buffer_thread_exists(known):
                        del self._order[known]
            while len(self._order) >= self.max_threads:
                oldest, _ = self._order.popitem(last=False)
                self._backend.buffer_delete_thread(oldest)
                self._views.pop(oldest, None)
            self._order[thread_id] = None

    def append(self, thread_id: str, payload: Any, from_id: str, to_id: str,
               own_name: str | None = None, is_self_call: bool = False, usage_instructions: str = "",
               *, append_id: str | None = None) -> BufferSlot:
        """Store a validated payload at the end of `thread_id`'s log and return its slot.

        `append_id` makes a retry of this append (after a timeout, say) return the first call's slot
        instead of storing it twice; reusing it for a different slot raises AppendIdConflict.
        Raises ThreadFullError at max_slots_per_thread.
        """
        if not self._shared:
            self._admit(thread_id)
        return self.store(self.prepare(thread_id, payload, from_id, to_id, own_name, is_self_call=is_self_call,
                                       usage_instructions=usage_instructions, append_id=append_id))

    def append_and_put(self, thread_id: str, payload: Any, from_id: str, to_id: str, own_name: str | None = None,
                       *, append_id: str | None = None, temps: Temps) -> BufferSlot:
        """append(), then temp_put(key, value) of each of `temps` (values already signed; or a
        function of the index the slot is signed for that returns them), in one round trip on the
        manager and redis backends. A full thread raises before anything is stored."""
        return self.store(self.prepare(thread_id, payload, from_id, to_id, own_name, append_id=append_id), temps)

    def prepare(self, thread_id: str, payload: Any, from_id: str, to_id: str, own_name: str | None = None,
                *, is_self_call: bool = False, usage_instructions: str = "",
                append_id: str | None = None) -> PreparedAppend:
        """The slot append() would store, pickled, without storing it: for `store` / `store_async`
        (the pump sends the append through its asyncio Redis pipe)."""
        if append_id is not None and (not isinstance(append_id, str) or not append_id
                                      or len(append_id.encode()) > MAX_APPEND_ID):
            raise ValueError(f"append_id must be a non-empty string of at most {MAX_APPEND_ID} bytes, "
                             f"got {append_id!r:.80}")
        slot = make_slot(payload, thread_id, from_id, to_id, UNASSIGNED, datetime.now(timezone.utc).isoformat(),
                         type(payload).__name__, own_name, is_self_call, usage_instructions)
        body = pickle.dumps(slot, protocol=pickle.HIGHEST_PROTOCOL)
        return PreparedAppend(slot, body, append_id, self._place(thread_id))

    def store(self, prepared: PreparedAppend, temps: Temps = ()) -> BufferSlot:
        """Store a prepared slot (compare-and-append, signed for the index it lands at), and `temps`
        in the same round trip (see append_and_put)."""
        # One blocking append per thread at a time from this buffer: threads of one process that
        # append to the same thread concurrently would reach the backend in any order, and every
        # slot that overtakes one with a lower index is refused and signed again. In turn, each
        # lands in its first round trip.
        with self._append_locks[hash(prepared.thread_id) % len(self._append_locks)]:
            index = self._claim(prepared.thread_id)
            for _ in range(MAX_APPEND_ATTEMPTS):
                outcome = self._backend.buffer_append_at(prepared.thread_id, prepared.blob(index), index,
                                                         max_slots=self.max_slots_per_thread,
                                                         append_id=prepared.append_id,
                                                         items=temps(index) if callable(temps) else temps)
                done = self.settle(prepared, index, outcome)
                if isinstance(done, BufferSlot):
                    if callable(temps) and done.index != index:
                        # A repeat: the slot is the first append's, at another index than the one
                        # the values were made for. Values that name the slot's place are put again.
                        self._backend.temp_put_many(list(temps(done.index)))
                    return done
                index = done
        raise self._contended(prepared)

    async def store_async(self, prepared: PreparedAppend,
                          send: Callable[[int, bytes], Awaitable[Appended]]) -> BufferSlot:
        """`store` with the backend call made by `send(index, blob)` (e.g. the pump's RedisPipe)."""
        return await self.store_claimed(prepared, lambda index: send(index, prepared.blob(index)))

    async def store_claimed(self, prepared: PreparedAppend,
                            send: Callable[[int], Awaitable[Appended]]) -> BufferSlot:
        """`store_async` where `send(index)` also signs: it calls `prepared.blob(index)` itself, so
        a sender that batches can sign in its own thread (manager_store.py)."""
        index = self._claim(prepared.thread_id)
        for _ in range(MAX_APPEND_ATTEMPTS):
            done = self.settle(prepared, index, await send(index))
            if isinstance(done, BufferSlot):
                return done
            index = done
        raise self._contended(prepared)

    def settle(self, prepared: PreparedAppend, index: int, outcome: Appended) -> BufferSlot | int:
        """The stored slot, or the index to sign for and try next."""
        thread_id = prepared.thread_id
        if outcome.status == "stored":
            if outcome.position != index:
                raise BackendError(f"thread {thread_id!r}: the backend stored a slot signed for index {index} "
                                   f"at {outcome.position}")
            self._landed(thread_id, index)
            return prepared.slot.at_index(index)
        if outcome.status == "moved":
            return self._claim(thread_id, outcome.position)
        return self._repeat(prepared, outcome.position, outcome.stored)

    def _repeat(self, prepared: PreparedAppend, index: int, stored: bytes | None) -> BufferSlot:
        """The append id was recorded for the slot at `index`. It is the same append if that slot
        verifies at its place, carries this append id, and holds the same slot apart from its
        timestamp (a retry builds the slot again): same payload, sender, receiver and flags."""
        thread_id, aid = prepared.thread_id, prepared.append_id or ""
        if stored is None:
            raise AppendIdConflict(thread_id, aid, index, "is gone (expired or deleted)")
        aid_stored, body = self._open(prepared._place, stored, index)  # noqa: SLF001 - same module
        if aid_stored != prepared._aid:  # noqa: SLF001
            raise SlotIntegrityError(f"thread {thread_id!r} slot {index}: the append id record points at a slot "
                                     "written under another append id (the record was tampered with)")
        if body == prepared.body:
            return prepared.slot.at_index(index)
        slot = self._unpickle(body, thread_id, index)
        if not _same_append(slot, prepared.slot):
            raise AppendIdConflict(thread_id, aid, index)
        return slot.at_index(index)

    @staticmethod
    def _contended(prepared: PreparedAppend) -> BackendError:
        return BackendError(f"thread {prepared.thread_id!r}: the slot was not stored after {MAX_APPEND_ATTEMPTS} "
                            "attempts, each time another writer's slot was stored first")

    # -- per thread: the expected next index and the signing place (bounded LRU) -----------------------
    def expected_index(self, thread_id: str) -> int:
        """The index the next slot of `thread_id` is signed for first (its length as last seen)."""
        with self._cache_lock:
            entry = self._threads.get(thread_id)
            return entry[0] if entry is not None else 0

    def _claim(self, thread_id: str, length: int | None = None) -> int:
        """The index to sign the next slot of `thread_id` for, taken from the thread's expected length.

        Appends this buffer has in flight on one thread get consecutive indices (k, k+1, ...): the
        pump sends hundreds at once through one pipelined connection, in order, and all of them land
        in that one round; signing each for the same k would land one per round. `length` is the
        length the backend answered with ("moved"): beyond our own claims it is another writer's
        doing and we continue after it; below them an earlier claim of ours has not landed (or never
        will: it failed), so that index is tried.
        """
        with self._cache_lock:
            entry = self._threads.get(thread_id)
            if entry is None:
                entry = [0, self._backend.signer.place(self._namespace, thread_id)]
                self._add(thread_id, entry)
            else:
                self._threads.move_to_end(thread_id)
            if length is not None and length < entry[0]:
                return length
            index = entry[0] if length is None else length
            entry[0] = index + 1
            return index

    def _landed(self, thread_id: str, index: int) -> None:
        """A slot was stored at `index`: the thread holds at least index + 1 slots."""
        with self._cache_lock:
            entry = self._threads.get(thread_id)
            if entry is not None:
                entry[0] = max(entry[0], index + 1)
            else:
                self._add(thread_id, [index + 1, self._backend.signer.place(self._namespace, thread_id)])

    def _remember(self, thread_id: str, length: int) -> None:
        with self._cache_lock:
            entry = self._threads.get(thread_id)
            if entry is not None:
                entry[0] = length
                self._threads.move_to_end(thread_id)
            else:
                self._add(thread_id, [length, self._backend.signer.place(self._namespace, thread_id)])

    def _add(self, thread_id: str, entry: list[Any]) -> None:
        cache = self._threads
        cache[thread_id] = entry
        if len(cache) > EXPECTED_INDEX_CACHE:
            cache.popitem(last=False)

    def _forget(self, thread_id: str | None = None) -> None:
        with self._cache_lock:
            if thread_id is None:
                self._threads.clear()
            else:
                self._threads.pop(thread_id, None)

    def _place(self, thread_id: str) -> SlotPlace:
        signer = self._backend.signer
        with self._cache_lock:
            entry = self._threads.get(thread_id)
            if entry is not None and entry[1].signer is signer:
                self._threads.move_to_end(thread_id)
                return cast(SlotPlace, entry[1])
            place = signer.place(self._namespace, thread_id)
            if entry is not None:
                entry[1] = place
            else:
                self._add(thread_id, [0, place])
            return place

    @staticmethod
    def _open(place: SlotPlace, blob: bytes, index: int) -> tuple[bytes, bytes]:
        try:
            return place.open(blob, index)
        except SlotIntegrityError as e:
            raise SlotIntegrityError(f"thread {place.thread_id!r} slot {index}: {e}") from None

    @staticmethod
    def _unpickle(body: bytes, thread_id: str, index: int) -> BufferSlot:
        slot = unpickle(body)
        if not isinstance(slot, BufferSlot) or slot.metadata.thread_id != thread_id:
            raise BackendError(f"thread {thread_id!r} slot {index} holds a {type(slot).__name__}, "
                               "not a BufferSlot of this thread")
        return slot

    def _load(self, place: SlotPlace, blob: bytes, index: int) -> BufferSlot:
        slot = self._unpickle(self._open(place, blob, index)[1], place.thread_id, index)
        # A freshly unpickled slot nobody else holds: set its position in place (at_index would copy
        # it; every slot of every read comes through here).
        slot.metadata.__dict__["slot_index"] = index
        return slot

    def get_thread_slots(self, thread_id: str) -> list[BufferSlot]:
        """All slots of a thread, in order ([] for an unknown thread)."""
        blobs = self._backend.buffer_get_thread(thread_id)
        slots: list[BufferSlot] = []
        append, loads = slots.append, pickle.loads
        for index, body in enumerate(self._place(thread_id).bodies(blobs)):  # every slot verified first
            try:
                slot = loads(body)
                fields = slot.metadata.__dict__
                ok = type(slot) is BufferSlot and type(slot.metadata) is SlotMetadata and fields["thread_id"] == thread_id
            except Exception:  # noqa: BLE001 - said precisely by _unpickle below
                ok = False
            if not ok:
                slot = self._unpickle(body, thread_id, index)  # raises, saying what it holds
                fields = slot.metadata.__dict__
            # A freshly unpickled slot nobody else holds: its position is set in place.
            fields["slot_index"] = index
            append(slot)
        self._remember(thread_id, len(slots))
        return slots

    def get_thread(self, thread_id: str) -> ThreadContext | None:
        """A snapshot of the thread, or None if it does not exist."""
        slots = self.get_thread_slots(thread_id)
        return ThreadContext(thread_id, slots) if slots else None

    def get_slot(self, thread_id: str, index: int) -> BufferSlot | None:
        """One slot by position (negative counts from the end), or None."""
        blob = self._backend.buffer_get_slot(thread_id, index)
        if blob is None:
            return None
        if index < 0:  # a second round trip; slots are never removed one by one, so it is stable
            index += self._backend.buffer_thread_len(thread_id)
        return self._load(self._place(thread_id), blob, index)

    def thread_len(self, thread_id: str) -> int:
        return self._backend.buffer_thread_len(thread_id)

    def thread_exists(self, thread_id: str) -> bool:
        return self._backend.buffer_thread_exists(thread_id)

    def delete_thread(self, thread_id: str) -> bool:
        with self._lock:
            self._order.pop(thread_id, None)
        self._forget(thread_id)
        return self._backend.buffer_delete_thread(thread_id)

    def get_stats(self) -> dict[str, Any]:
        """xml-pipeline's keys (thread_count, total_slots, max_threads, max_slots_per_thread,
        threads, backend: "shared" | "local") plus backend_type (memory | manager | redis)."""
        threads = self._backend.buffer_list_threads()
        return {
            "thread_count": len(threads),
            "total_slots": sum(self._backend.buffer_thread_len(t) for t in threads),
            "max_threads": self.max_threads,
            "max_slots_per_thread": self.max_slots_per_thread,
            "threads": threads,
            "backend": "shared" if self._shared else "local",
            "backend_type": getattr(getattr(self._backend, "config", None), "backend_type",
                                    type(self._backend).__name__),
        }

    def clear(self) -> None:
        """Delete every thread (testing)."""
        with self._lock:
            self._order.clear()
        self._forget()
        self._backend.buffer_clear()

    def __repr__(self) -> str:
        return f"ContextBuffer(backend={self._backend!r}, max_slots_per_thread={self.max_slots_per_thread})"


def _same_append(stored: BufferSlot, new: BufferSlot) -> bool:
    """Same slot apart from the timestamp: payload, sender, receiver, name and flags."""
    a, b = stored.metadata, new.metadata
    if (a.thread_id, a.from_id, a.to_id, a.payload_type, a.own_name, a.is_self_call, a.usage_instructions) != \
            (b.thread_id, b.from_id, b.to_id, b.payload_type, b.own_name, b.is_self_call, b.usage_instructions):
        return False
    try:
        if stored.payload == new.payload:  # a payload without __eq__ falls through to its pickle
            return True
    except Exception:  # noqa: BLE001 - e.g. an array whose == is elementwise
        pass
    try:
        return pickle.dumps(stored.payload, pickle.HIGHEST_PROTOCOL) == pickle.dumps(new.payload, pickle.HIGHEST_PROTOCOL)
    except Exception:  # noqa: BLE001 - unpicklable here: not provably the same
        return False


_default_lock = threading.Lock()
_default_buffer: ContextBuffer | None = None


def get_context_buffer(backend: SharedBackend | None = None) -> ContextBuffer:
    """The context buffer on `backend`; without one, the process-wide buffer on the configured backend.

    Without an argument the backend comes from the environment (`BackendConfig.from_env()`:
    XP_BACKEND_TYPE etc., memory when nothing is set) and is shared with `get_registry()`. Unlike
    the original singleton, a `backend` passed here is never ignored.
    """
    global _default_buffer
    if backend is not None:
        return ContextBuffer(backend)
    with _default_lock:
        if _default_buffer is None:
            from .factory import default_backend
            backend = default_backend()
            _default_buffer = ContextBuffer(backend)
            # No backend was asked for: "shared" only if the configured one reaches other processes.
            _default_buffer._shared = bool(backend.is_shared)
        return _default_buffer


def reset_context_buffer() -> None:
    """Clear the process-wide buffer's threads, then forget it (tests), as xml-pipeline does.

    Its backend stays open (reset_shared_backend() closes it)."""
    global _default_buffer
    with _default_lock:
        buffer, _default_buffer = _default_buffer, None
    if buffer is not None:
        try:
            buffer.clear()
        except BackendUnavailable:
            pass  # its backend is closed or gone: nothing left that a later buffer could see


def forget_context_buffer() -> None:
    """Forget the process-wide buffer without touching its data."""
    global _default_buffer
    with _default_lock:
        _default_buffer = None
