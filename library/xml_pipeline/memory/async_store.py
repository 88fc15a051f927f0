"""The AsyncStore implementations (store.py): io threads for memory and manager, a RedisPipe on Redis.

`RedisStore` keeps every Redis-specific decision inside: what goes through the pipe (group commit
from the event loop), what the pipe's answers mean, and the fallback to the blocking backend for
whatever the pipe cannot confirm. The pipe never retries and never interprets trouble
(redis_pipe.py): an append it cannot confirm (`Unsure`: a lost connection, NOSCRIPT after a restart
or a SCRIPT/FUNCTION FLUSH, a full thread, a refused command) is sent again, the same slot at the
same index with the same append id, through the blocking backend, whose retries, script reload and
errors (ThreadFullError, BackendUnavailable, ...) are the contract's; a repeat of an append the pipe
did store is recognised by its append id. Takes and deletes are not redone: GET + DEL is not
idempotent, so a lost connection is the caller's BackendUnavailable, as from the blocking backend.

On a Redis Cluster the pipe is a ClusterPipe (redis_cluster_pipe.py): one RedisPipe per master,
each operation on the master of its slot. Appends fall back as above; takes, deletes and stream
batches the cluster refuses ("not here, not now") are redone there, so a resharding or a failover
reaches the caller only as a pause.
"""
from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from .protocol import Appended, SharedBackend
from .redis_cluster_pipe import ClusterPipe
from .redis_direct import DirectConnection
from .redis_pipe import RedisPipe, Unsure
from .store import INLINE_MAX_BYTES, AsyncStore
from .store_io import IoThreads

if TYPE_CHECKING:
    from .context_buffer import ContextBuffer, PreparedAppend, Temps
    from .redis_backend import RedisBackend
    from .slots import BufferSlot

T = TypeVar("T")

__all__ = ["ThreadedStore", "RedisStore", "open_store", "open_stream_store", "use_from_one_thread"]


class ThreadedStore:
    """AsyncStore over a blocking backend: each operation is one call in the io threads."""

    def __init__(self, backend: SharedBackend, io: IoThreads | int = 8) -> None:
        """`io`: the io threads to use (shared, not closed by close()), or how many to start."""
        self._backend = backend
        self._owns_io = not isinstance(io, IoThreads)
        self.io = io if isinstance(io, IoThreads) else IoThreads(io)

    @property
    def backend(self) -> SharedBackend:
        return self._backend

    @property
    def fallbacks(self) -> int:
        return 0

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await self.io.run(fn, *args)

    async def append(self, buffer: ContextBuffer, prepared: PreparedAppend,
                     items: Temps = ()) -> BufferSlot:
        # ContextBuffer.store, not store_async: it serialises the appends of one thread from several
        # io threads, so each lands in its first round trip instead of overtaking its predecessor.
        return await self.io.run(buffer.store, prepared, items)

    async def take(self, key: str, *also_delete: str) -> bytes | None:
        return await self.io.run(self._backend.temp_take, key, *also_delete)

    async def delete(self, *keys: str) -> int:
        return await self.io.run(self._backend.temp_delete, *keys)

    def close(self) -> None:
        if self._owns_io:
            self.io.close()


class RedisStore(ThreadedStore):
    """AsyncStore (and StreamStore) on a RedisBackend: group commit through a RedisPipe in the event
    loop where the URL allows one (`pipelined`; on a Redis Cluster a ClusterPipe, one RedisPipe per
    master), the io threads otherwise and for large values."""

    def __init__(self, backend: RedisBackend, io: IoThreads | int = 8, *, pipelined: bool = True) -> None:
        super().__init__(backend, io)
        self.redis = backend
        #: The group-commit connection(s) (None: no pipe for this URL, or pipelined=False).
        self.pipe: RedisPipe | ClusterPipe | None = self._new_pipe() if pipelined else None
        self._read_pipe: RedisPipe | ClusterPipe | None = None
        #: Without a pipe: one thread for the blocking reads, on a connection of its own.
        self._reader: IoThreads | None = None
        self._direct: DirectConnection | None = None
        self._direct_tried = False
        self._reading = threading.Lock()
        self._closed = False
        self._fallbacks = 0
        self._ready: asyncio.Future[None] | None = None

    def _new_pipe(self) -> RedisPipe | ClusterPipe | None:
        from .redis_cluster import RedisClusterBackend
        backend = self.redis
        if isinstance(backend, RedisClusterBackend):
            return ClusterPipe(backend, self.io.run) if backend.node_pipes_capable() else None
        return RedisPipe.for_backend(backend)

    @property
    def fallbacks(self) -> int:
        """Operations the pipe could not confirm, redone through the blocking backend."""
        extra = sum(p.fallbacks for p in (self.pipe, self._read_pipe) if isinstance(p, ClusterPipe))
        return self._fallbacks + extra

    async def append(self, buffer: ContextBuffer, prepared: PreparedAppend,
                     items: Temps = ()) -> BufferSlot:
        if self.pipe is None or len(prepared.body) > INLINE_MAX_BYTES:
            return await super().append(buffer, prepared, items)
        if self._ready is None or not self._ready.done():
            if self._ready is None:
                # The first append goes through the blocking backend, which probes the script
                # mechanism and loads the scripts: the pipe then starts on a server that has them,
                # instead of every append of the first burst meeting NOSCRIPT and falling back.
                self._ready = asyncio.get_running_loop().create_future()
                try:
                    return await super().append(buffer, prepared, items)
                finally:
                    self._ready.set_result(None)
            await self._ready
        thread, append_id, max_slots = prepared.thread_id, prepared.append_id, buffer.max_slots_per_thread
        assert append_id is not None, "the pipe's appends are redone on doubt: they need an append id"
        pipe = self.pipe

        async def send(index: int, blob: bytes) -> Appended:
            values = items(index) if callable(items) else items  # values may name the slot's index
            try:
                return await pipe.append_at(thread, blob, index, max_slots=max_slots, append_id=append_id,
                                            items=values)
            except Unsure:
                # The same slot at the same index with the same append id, through the backend.
                self._fallbacks += 1
                return await self.io.run(functools.partial(self.redis.buffer_append_at, thread, blob, index,
                                                           max_slots=max_slots, append_id=append_id, items=values))

        return await buffer.store_async(prepared, send)

    async def take(self, key: str, *also_delete: str) -> bytes | None:
        if self.pipe is None:
            return await super().take(key, *also_delete)
        return await self.pipe.take(key, *also_delete)

    async def delete(self, *keys: str) -> int:
        if self.pipe is None:
            return await super().delete(*keys)
        return await self.pipe.delete(*keys)

    # -- StreamStore ------------------------------------------------------------------------------------
    async def execute(self, commands: list[tuple[Any, ...]], *, what: str) -> list[Any]:
        if self.pipe is None:
            return await self.io.run(self._execute_blocking, commands, what)
        if isinstance(self.pipe, ClusterPipe):
            return await self.pipe.execute(commands, what=what)
        return await self.pipe.execute(self.redis.pack_commands(commands), len(commands), what=what)

    def _execute_blocking(self, commands: list[tuple[Any, ...]], what: str) -> list[Any]:
        backend = self.redis
        return backend.execute(lambda _client: backend.send_commands(commands), idempotent=False, what=what)

    async def read(self, commands: list[tuple[Any, ...]], *, what: str) -> list[Any]:
        if self.pipe is not None:
            if self._read_pipe is None:
                self._read_pipe = self._new_pipe()
                assert self._read_pipe is not None
            if isinstance(self._read_pipe, ClusterPipe):
                return await self._read_pipe.execute(commands, what=what)
            return await self._read_pipe.execute(self.redis.pack_commands(commands), len(commands), what=what)
        if self._reader is None:
            self._reader = IoThreads(1, name="xp-read")
        return await self._reader.run(self._read_blocking, commands, what)

    def _read_blocking(self, commands: list[tuple[Any, ...]], what: str) -> list[Any]:
        """(the reader thread) On that thread's own connection where the URL allows one."""
        backend = self.redis
        with self._reading:
            if not self._direct_tried:
                self._direct_tried = True
                self._direct = backend.new_direct_connection()
            direct = self._direct
            if direct is None:
                return self._execute_blocking(commands, what)
            try:
                return backend.execute(lambda _client: direct.pipeline(backend.pack_commands(commands),
                                                                       len(commands)), idempotent=False, what=what)
            finally:
                if self._closed:  # closed while this read blocked: the connection is this thread's to drop
                    direct.disconnect()

    def close(self) -> None:
        self._closed = True
        for pipe in (self.pipe, self._read_pipe):
            if pipe is not None:
                pipe.close()
        if self._reader is not None:
            self._reader.close()
        if self._direct is not None and self._reading.acquire(blocking=False):
            try:
                self._direct.disconnect()
            finally:
                self._reading.release()
        super().close()


def open_store(backend: SharedBackend, io: IoThreads | int = 8, *, pipelined: bool = True) -> AsyncStore:
    """The AsyncStore for `backend`: a RedisStore on Redis, a ManagerStore (batched appends) on the
    manager, a ThreadedStore otherwise."""
    from .manager import ManagerBackend
    from .redis_backend import RedisBackend
    if isinstance(backend, RedisBackend):
        return RedisStore(backend, io, pipelined=pipelined)
    if isinstance(backend, ManagerBackend):
        from .manager_store import ManagerStore
        return ManagerStore(backend, io)
    return ThreadedStore(backend, io)


def open_stream_store(backend: RedisBackend, *, pipelined: bool = True) -> RedisStore:
    """The StreamStore of a dispatcher on `backend` (its own pipes and threads)."""
    return RedisStore(backend, 2, pipelined=pipelined)


def use_from_one_thread(backend: SharedBackend) -> None:
    """Tell `backend` that this process calls it from one thread only (a worker's task loop): on
    Redis its batched commands then skip the connection pool (RedisBackend.use_direct_connection)."""
    from .redis_backend import RedisBackend
    if isinstance(backend, RedisBackend):
        backend.use_direct_connection()
