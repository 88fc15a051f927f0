"""IoThreads: blocking backend calls from an event loop, with one wake-up per batch of outcomes.

The memory and manager backends (and the Redis backend where its pipe cannot go) are blocking:
the async store runs their calls in a few threads. With hundreds of conversations in flight, most
of the cost of such a hop is waking the event loop (`call_soon_threadsafe` writes its self-pipe).
Outcomes finished while the loop has not yet collected the earlier ones share one wake-up, so a
busy pump pays one self-pipe write per batch instead of per call.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = ["IoThreads"]


class IoThreads:
    """A pool of `size` threads for blocking calls awaited from one event loop."""

    def __init__(self, size: int = 8, *, name: str = "xp-io") -> None:
        self.size = size
        self._pool = concurrent.futures.ThreadPoolExecutor(size, thread_name_prefix=name)
        self._lock = threading.Lock()
        self._done: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
        self._wake_pending = False

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` in an io thread; its result, or its exception raised here."""
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._pool.submit(self._work, fut, fn, args)
        return await fut

    def _work(self, fut: asyncio.Future[Any], fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        """(io thread) Run one call and hand its outcome to the loop, sharing a pending wake-up."""
        try:
            value, error = fn(*args), None
        except BaseException as e:  # noqa: BLE001 - re-raised in the awaiting task
            value, error = None, e
        with self._lock:
            self._done.append((fut, value, error))
            if self._wake_pending:
                return
            self._wake_pending = True
        try:
            fut.get_loop().call_soon_threadsafe(self._collect)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            with self._lock:
                self._done.clear()
                self._wake_pending = False

    def _collect(self) -> None:
        with self._lock:
            done, self._done = self._done, []
            self._wake_pending = False
        for fut, value, error in done:
            if fut.cancelled():
                continue
            if error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(value)

    def close(self) -> None:
        """Stop taking calls; calls not started yet are dropped, running ones finish on their own."""
        self._pool.shutdown(wait=False, cancel_futures=True)
