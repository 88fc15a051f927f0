"""IoThreads: blocking backend calls from an event loop, with one wake-up per batch of outcomes.

The memory and manager backends (and the Redis backend where its pipe cannot go) are blocking:
the async store runs their calls in a few threads. With hundreds of conversations in flight, most
of the cost of such a hop is waking the event loop (`call_soon_threadsafe` writes its self-pipe).
Outcomes finished while the loop has not yet collected the earlier ones share one wake-up, so a
busy pump pays one self-pipe write per batch instead of per call.
"""
from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = ["IoThreads"]

_Call = tuple[asyncio.Future[Any], Callable[..., Any], tuple[Any, ...]]


class IoThreads:
    """A pool of `size` threads for blocking calls awaited from one event loop."""

    def __init__(self, size: int = 8, *, name: str = "xp-io") -> None:
        if size < 1:
            raise ValueError(f"io threads must be >= 1, got {size}")
        self.size = size
        self._name = name
        # A bare queue and daemon threads rather than a ThreadPoolExecutor: no Future, work item or
        # semaphore per call (a hop is a few microseconds of the pump's CPU, not tens).
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._done: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
        self._wake_pending = False
        self._closed = False

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` in an io thread; its result, or its exception raised here."""
        if self._closed:
            raise RuntimeError("the io threads are closed")
        if len(self._threads) < self.size:
            self._start_thread()
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._calls.put((fut, fn, args))
        return await fut

    def _start_thread(self) -> None:
        # One more thread per call until `size` run: a store that is never used starts none.
        thread = threading.Thread(target=self._serve, name=f"{self._name}-{len(self._threads)}", daemon=True)
        self._threads.append(thread)
        thread.start()

    def _serve(self) -> None:
        calls = self._calls
        while True:
            call = calls.get()
            if call is None:
                return
            self._work(*call)

    def _work(self, fut: asyncio.Future[Any], fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        """(io thread) Run one call and hand its outcome to the loop, sharing a pending wake-up."""
        if fut.cancelled():
            return
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
        self._closed = True
        while True:
            try:
                call = self._calls.get_nowait()
            except queue.Empty:
                break
            if call is not None and not call[0].done():
                try:
                    call[0].get_loop().call_soon_threadsafe(_cancel, call[0])
                except RuntimeError:  # the loop is closed: nobody is waiting any more
                    pass
        for _ in self._threads:
            self._calls.put(None)


def _cancel(fut: asyncio.Future[Any]) -> None:
    if not fut.done():
        fut.cancel()
