"""Feeding a pump many messages at once (benchmarks, batch jobs): `run_messages`."""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .message import Message

if TYPE_CHECKING:
    from .stream_pump import StreamPump


async def run_messages(pump: StreamPump, messages: list[Message], *,
                       on_progress: Callable[[int, int], None] | None = None,
                       window: int = 256) -> float:
    """Inject `messages` (at most `window` conversations in flight at once) and wait for all of them.

    Returns the elapsed seconds. `on_progress(done, total)` is called as conversations finish.
    """
    start = time.perf_counter()
    total = len(messages)
    done = 0
    slots = asyncio.Semaphore(window)
    finished = asyncio.Event()
    if total == 0:
        return 0.0
    previous = pump.on_done

    def _done(conv_id: str) -> Any:
        nonlocal done
        done += 1
        slots.release()
        if on_progress is not None:
            on_progress(done, total)
        if done >= total:
            finished.set()
        return previous(conv_id) if previous is not None else None

    pump.on_done = _done
    try:
        for m in messages:
            await slots.acquire()
            await pump.inject(m)
        await finished.wait()
    finally:
        pump.on_done = previous
    return time.perf_counter() - start
