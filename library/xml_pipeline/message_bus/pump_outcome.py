"""What a cpu_bound task produced, as the pump routes it: the handler's actions, or an error.

A worker's answer reaches the pump with its result (worker_task.py): over a local worker's own
pipe, or from a worker pod sealed in the result entry, which the dispatcher verified and opened. A
response that is missing, failed its check (the dispatcher's IntegrityError) or does not decode
becomes an error the pump routes back, never an exception out of the pump.
"""
from __future__ import annotations

import logging

from ..memory.store import INLINE_MAX_BYTES, AsyncStore
from .message import Action, MessageError
from .worker_task import WorkerResult, carried_response

log = logging.getLogger(__name__)

#: (the handler's actions, None), or (None, (error type, detail)).
Outcome = tuple[list[Action] | None, tuple[str, str] | None]

__all__ = ["Outcome", "carried"]


async def carried(store: AsyncStore, result: WorkerResult) -> Outcome:
    """The outcome of a task that carried its message: the response came back with the result."""
    body = result.response
    if not result.ok or body is None:
        return None, (result.error_type or "WorkerError", result.error or "the worker sent no response")
    if len(body) > INLINE_MAX_BYTES:  # decoding it would hold up the loop
        return await store.run(_carried_outcome, result, body)
    return _carried_outcome(result, body)


def _carried_outcome(result: WorkerResult, body: bytes) -> Outcome:
    try:
        return carried_response(body), None
    except (MessageError, ValueError) as e:
        log.error("task %s: cannot read the response: %s", result.task_id, e)
        return None, ("MissingData", f"{type(e).__name__}: {e}")
