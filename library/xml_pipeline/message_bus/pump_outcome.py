"""What a cpu_bound task produced, as the pump routes it: the handler's actions, or an error.

A worker's answer reaches the pump one of two ways (worker_task.py): under a temp key of the
backend (a worker pod; `collect` fetches and verifies it and deletes the task's temp keys in the
same step), or with the result itself over a local worker's own pipe (`carried`). Either way a
response that is gone, fails its check or does not decode becomes an error the pump routes back
(IntegrityError, MissingData, BackendError), never an exception out of the pump.
"""
from __future__ import annotations

import logging

from ..errors import BackendError, SlotIntegrityError
from ..memory.store import INLINE_MAX_BYTES, AsyncStore
from .message import Action, MessageError
from .worker_task import WorkerResult, carried_response, open_response

log = logging.getLogger(__name__)

#: (the handler's actions, None), or (None, (error type, detail)).
Outcome = tuple[list[Action] | None, tuple[str, str] | None]

__all__ = ["Outcome", "carried", "collect"]


async def collect(store: AsyncStore, result: WorkerResult, keys: tuple[str, str]) -> Outcome:
    """Fetch the worker's response from the backend, and delete every temp key of the task."""
    try:
        if not result.ok or result.response_key is None:
            await store.delete(*keys)
            return None, (result.error_type or "WorkerError", result.error or "unknown error")
        response_key = result.response_key
        blob = await store.take(response_key, *keys)
        if blob is not None and len(blob) > INLINE_MAX_BYTES:  # verifying it would hold up the loop
            return await store.run(_stored_outcome, store, result, blob, response_key)
        return _stored_outcome(store, result, blob, response_key)
    except BackendError as e:
        # Could not reach the backend to collect: the temp keys expire with the TTL anyway.
        log.error("task %s: cannot collect the response: %s", result.task_id, e)
        return None, ("BackendError", f"{type(e).__name__}: {e}")


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


def _stored_outcome(store: AsyncStore, result: WorkerResult, blob: bytes | None, key: str) -> Outcome:
    """(actions, None), or (None, error) for a response that is gone, fails its integrity check
    or cannot be decoded."""
    try:
        return open_response(store.backend, blob, key), None
    except SlotIntegrityError as e:
        log.error("task %s: the response failed its integrity check: %s", result.task_id, e)
        return None, ("IntegrityError", f"SlotIntegrityError: {e}")
    except (LookupError, MessageError, ValueError) as e:
        log.error("task %s: cannot read the response: %s", result.task_id, e)
        return None, ("MissingData", f"{type(e).__name__}: {e}")
