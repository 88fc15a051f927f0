"""The async face of the Shared Backend: what the pump and the dispatcher await, one path per step.

The blocking interface is `protocol.SharedBackend` (with its batches: `buffer_append_at` with the
worker's temp inputs, `temp_take`, `temp_put_many`, `temp_get_many`). The pump's event loop needs
the same operations as coroutines, and how they reach the store differs per backend:

- memory and manager (`async_store.ThreadedStore`): the blocking call in the store's io threads
  (store_io.IoThreads: one loop wake-up per batch of outcomes);
- Redis (`async_store.RedisStore`): the commands group-committed through a RedisPipe from the
  event loop; whatever the pipe cannot confirm (a lost connection, a script missing after a
  restart or a FLUSH, a full thread, a refused command) is redone through the blocking backend in
  the io threads, whose retries and errors are the contract's. Where no pipe can go (pipelined=False,
  or TLS settings only redis-py checks, such as OCSP), every call takes the io threads.

Callers never learn which: there is one `append`, one `take`, one `delete`, and `run` for any other
blocking step (registry misses, admin calls). `open_store` picks the implementation.

`StreamStore` adds what the dispatcher sends on Redis Streams: a batch of commands (a MULTI of
XADDs) and a blocking read (XREAD BLOCK on a connection of its own, so it never holds up the rest).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

from .protocol import SharedBackend

if TYPE_CHECKING:
    from .context_buffer import ContextBuffer, PreparedAppend, Temps
    from .slots import BufferSlot

T = TypeVar("T")

#: Slots and values larger than this are pickled, signed and sent from the io threads even where a
#: pipe exists: doing it in the event loop would hold up every other conversation for milliseconds.
INLINE_MAX_BYTES = 64 * 1024


@runtime_checkable
class AsyncStore(Protocol):
    """The Shared Backend's hot-path operations as coroutines (one event loop)."""

    @property
    def backend(self) -> SharedBackend:
        """The blocking backend underneath (for everything that is not on the hot path)."""
        ...

    @property
    def fallbacks(self) -> int:
        """Operations the fast path could not confirm and redid through the blocking backend."""
        ...

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """A blocking step (`fn(*args)`) in the store's io threads."""
        ...

    async def append(self, buffer: ContextBuffer, prepared: PreparedAppend,
                     items: Temps = ()) -> BufferSlot:
        """Store a prepared slot (compare-and-append, signed for the index it lands at) and the
        signed temp `items` with it (or `items(index)`: values that depend on the index), in one
        round trip when nothing is contended. Raises what
        `ContextBuffer.store` raises (ThreadFullError, AppendIdConflict, BackendError, ...)."""
        ...

    async def take(self, key: str, *also_delete: str) -> bytes | None:
        """`temp_take`: the value of temp `key`, and `key` and `also_delete` deleted. Not retried
        (it is not idempotent): a lost connection raises BackendUnavailable."""
        ...

    async def delete(self, *keys: str) -> int:
        """`temp_delete`."""
        ...

    def close(self) -> None:
        """Close the store's connections and threads (not the backend)."""
        ...


@runtime_checkable
class StreamStore(AsyncStore, Protocol):
    """An AsyncStore on Redis, with the commands of the distributed mode's streams."""

    async def execute(self, commands: list[tuple[Any, ...]], *, what: str) -> list[Any]:
        """Send `commands` in one round trip; their replies, error replies in place. Raises
        BackendUnavailable when the connection fails (nothing is retried: a MULTI of XADDs is
        not idempotent)."""
        ...

    async def read(self, commands: list[tuple[Any, ...]], *, what: str) -> list[Any]:
        """`execute` on a connection of its own, for commands that block (XREAD BLOCK)."""
        ...
