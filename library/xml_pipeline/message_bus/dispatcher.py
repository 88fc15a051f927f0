"""The pump's side of distributed mode: WorkerTasks out to the tasks stream, WorkerResults in from
the pump's own results stream (streams.py describes the streams and how a task stays safe).

A task goes out with its message sealed in the entry and its result comes back with the response
sealed in it (task_seal.py): the dispatcher seals and opens them, so the pump hands it the message
and gets the response's JSON back, as from a local pool.

Both directions go through the dispatcher's StreamStore (memory/store.py): on a pipe-capable URL a
RedisPipe in the event loop (group commit), otherwise the io threads; the dispatcher has one submit
path and one read loop either way."""
from __future__ import annotations

import asyncio
import collections
import logging
import random
import time
from typing import TYPE_CHECKING, Any

import redis

from ..errors import BackendUnavailable, SlotIntegrityError
from ..memory.async_store import RedisStore, open_stream_store
from ..memory.redis_cluster_route import SlotMoving
from ..memory.store import INLINE_MAX_BYTES, AsyncStore, StreamStore
from .retry import Backoff
from .streams import WAKE_MAXLEN, WORKER_GROUP, Streams, _check_transaction, _entries, _s, consumer_name
from .task_seal import namespace_of, open_response_body, seal_input
from .worker_task import (
    BACKEND_ERROR,
    INTEGRITY_ERROR,
    MISSING_DATA,
    TASK_DEADLINE,
    WORKER_DIED,
    WorkerResult,
    WorkerTask,
)

if TYPE_CHECKING:
    from ..memory.redis_backend import RedisBackend

log = logging.getLogger(__name__)

#: Tasks the pump sends in one MULTI when many are waiting.
SUBMIT_BATCH = 256
#: How long a submit to a task bucket whose slot is being moved (or whose master is failing over:
#: CLUSTERDOWN) is sent again: a slot with a few keys moves in milliseconds, a promotion takes a
#: few seconds.
SUBMIT_MOVED_SECONDS = 10.0


def _results_of(resp: Any, consumed: list[Any], last: str) -> tuple[list["WorkerResult"], str]:
    """The WorkerResults of an XREAD reply on a results stream and the last entry id read (`last`
    if none); each entry id is added to `consumed` (deleted with the next read)."""
    results = []
    for entry_id, fields in _entries(resp):
        last = _s(entry_id)
        consumed.append(entry_id)
        if isinstance(fields, list):
            fields = dict(zip(fields[::2], fields[1::2]))
        results.append(WorkerResult.from_fields(fields))
    return results, last


def _pipelined(store: AsyncStore) -> bool:
    return isinstance(store, RedisStore) and store.pipe is not None


class RedisDispatcher:
    """The pump's Dispatcher in distributed mode: XADD tasks, XREAD BLOCK results (no polling).

    The tasks submitted during one loop iteration share one MULTI per task bucket (one bucket off
    a cluster: streams.py); results are read by one task of the event loop (XREAD BLOCK on a
    connection of its own)."""

    def __init__(self, backend: RedisBackend, *, pump_id: str | None = None, pipelined: bool = True,
                 deadline: float | None = None, tasks_buckets: int | None = None) -> None:
        """`pipelined=False`: the store's io threads instead of its RedisPipe (always used where no pipe can go).
        `deadline`: seconds to wait for a task's result before answering it with a TaskDeadline
        error (None: wait forever); see process_pool.task_deadline. `tasks_buckets`: see Streams
        (the workers must use the same number)."""
        self.streams = Streams(backend, buckets=tasks_buckets)
        # Round robin over the buckets, from a random start: pumps do not all begin with bucket 0.
        self._next_bucket = random.randrange(len(self.streams.task_streams))
        self.deadline = deadline
        #: Tasks answered by the deadline, and when the last one was (health: are results overdue?).
        self.deadline_misses = 0
        self.last_miss = 0.0
        self.last_result = time.monotonic()
        self.backend = backend
        self._namespace = namespace_of(backend)
        self.pump_id = pump_id or consumer_name("pump")
        self.results_key = self.streams.results(self.pump_id)
        self.store: StreamStore = open_stream_store(backend, pipelined=pipelined)
        self._owns_store = True
        self._futures: dict[str, asyncio.Future[WorkerResult]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self._batch: list[WorkerTask] = []
        self._sending: set[asyncio.Future[Any]] = set()
        self._read_task: asyncio.Task[None] | None = None
        self.duplicates = 0
        #: Ids of the latest tasks answered (for logs and tests; dedupe itself uses the futures).
        self.completed_ids: collections.deque[str] = collections.deque(maxlen=1000)

    def describe(self) -> str:
        return f"{self.streams.describe_tasks()} (worker pods, consumer group {WORKER_GROUP!r})"

    def adopt_store(self, store: AsyncStore) -> None:
        """Submit through the pump's store when it is a pipelined StreamStore on this backend (as
        this dispatcher's own is): a loop iteration's XADDs then leave in the pump's write."""
        if self._read_task is not None:
            raise RuntimeError("adopt_store() comes before start() (or after close())")
        if not isinstance(store, StreamStore) or store.backend is not self.backend:
            return
        if _pipelined(store) != _pipelined(self.store):
            return
        if self._owns_store:
            self.store.close()
        self.store, self._owns_store = store, False

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self.store.run(self.streams.ensure_task_groups)
        self._read_task = asyncio.ensure_future(self._read_results())

    async def run(self, task: WorkerTask) -> WorkerResult:
        """Run `task` on a worker pod. A task carrying its message goes out sealed, and its result
        comes back with the response's JSON (`response`) or an error; a task in the temp-key form
        (its inputs stored by the caller) goes out as it is, and its result names the response key."""
        assert self._loop is not None, "start() the dispatcher first"
        sealed = b""
        if task.message is not None:
            sealed = seal_input(self.backend.signer, self._namespace, task.task_id, task.listener, task.handler,
                                task.message, task.slot_index)
        task = WorkerTask(task.task_id, task.listener, task.handler, task.payload_key, task.metadata_key,
                          reply_to=self.results_key, failures=0, sealed_input=sealed)
        fut: asyncio.Future[WorkerResult] = self._loop.create_future()
        self._futures[task.task_id] = fut
        # A timer, not wait_for: no extra task per worker task on the hot path.
        timer = self._loop.call_later(self.deadline, self._expire, task) if self.deadline else None
        try:
            self._batch.append(task)
            if len(self._batch) == 1:
                self._loop.call_soon(self._submit_batch)
            result = await fut
        finally:
            if timer is not None:
                timer.cancel()
            self._futures.pop(task.task_id, None)
        return await self._opened(result) if sealed else result

    async def _opened(self, result: WorkerResult) -> WorkerResult:
        """The result of a sealed task with its response opened (verified for the task, then
        `response` = the actions' JSON), or an error result saying why there is none."""
        if not result.ok:
            return result
        blob = result.sealed_response
        if not blob:
            return WorkerResult(result.task_id, error="the worker answered a sealed task without a response",
                                error_type=MISSING_DATA, worker=result.worker)
        args = (self.backend.signer, self._namespace, result.task_id, blob)
        try:
            # Verifying a large response would hold up the loop: the io threads do it.
            body = await self.store.run(open_response_body, *args) if len(blob) > INLINE_MAX_BYTES \
                else open_response_body(*args)
        except SlotIntegrityError as e:
            log.error("task %s: the response failed its integrity check: %s", result.task_id, e)
            return WorkerResult(result.task_id, error=f"SlotIntegrityError: {e}", error_type=INTEGRITY_ERROR,
                                worker=result.worker)
        return WorkerResult(result.task_id, worker=result.worker, response=body)

    def _expire(self, task: WorkerTask) -> None:
        """(loop) The deadline of `task` passed without a result: answer it with an error. A result
        that still comes is dropped as a duplicate."""
        fut = self._futures.get(task.task_id)
        if fut is None or fut.done():
            return
        self.deadline_misses += 1
        self.last_miss = time.monotonic()
        error = (f"no result from a worker within {self.deadline:g} s (process_pool.task_deadline_seconds): "
                 f"the task was lost (e.g. Redis restarted without persistence) or no worker is consuming "
                 f"{self.streams.describe_tasks()}")
        log.error("task %s (listener %s): %s", task.task_id, task.listener, error)
        fut.set_result(WorkerResult(task.task_id, error=error, error_type=TASK_DEADLINE))

    def overdue(self) -> str | None:
        """Why results are overdue (a task missed its deadline and no result came since), or None."""
        if self.deadline_misses and self.last_miss > self.last_result:
            return (f"results overdue: {self.deadline_misses} task(s) got no result within "
                    f"{self.deadline:g} s and no worker result has arrived since")
        return None

    def _submit_commands(self, batch: list[WorkerTask], stream: str | None = None) -> list[tuple[Any, ...]]:
        s = self.streams
        stream = stream or s.tasks
        cmds: list[tuple[Any, ...]] = [("MULTI",)]
        cmds.extend(("XADD", stream, "*", *(x for kv in task.to_fields().items() for x in kv)) for task in batch)
        if s.ttl:
            cmds.append(("EXPIRE", stream, s.ttl))
        cmds.append(("EXEC",))
        return cmds

    def _by_bucket(self, batch: list[WorkerTask]) -> dict[str, list[WorkerTask]]:
        """`batch` dealt out over the task buckets, round robin (one bucket: all of it)."""
        streams = self.streams.task_streams
        if len(streams) == 1:
            return {streams[0]: batch}
        out: dict[str, list[WorkerTask]] = {}
        n = self._next_bucket
        for task in batch:
            out.setdefault(streams[n], []).append(task)
            n = (n + 1) % len(streams)
        self._next_bucket = n
        return out

    def _submit_batch(self) -> None:
        """(loop) Everything submitted since the last call: one MULTI per task bucket and
        SUBMIT_BATCH tasks (a MULTI stays in one slot)."""
        batch, self._batch = self._batch, []
        groups = self._by_bucket(batch)
        if self.streams.sharded:
            sending = asyncio.ensure_future(self._submit_sharded(groups))
            self._sending.add(sending)
            sending.add_done_callback(self._sending.discard)
            return
        for stream, tasks in groups.items():
            for i in range(0, len(tasks), SUBMIT_BATCH):
                submit = asyncio.ensure_future(self._submit(tasks[i:i + SUBMIT_BATCH], stream))
                self._sending.add(submit)
                submit.add_done_callback(self._sending.discard)

    async def _submit_sharded(self, groups: dict[str, list[WorkerTask]]) -> None:
        """Every bucket's MULTIs at once, then the doorbell naming the buckets that got tasks
        (streams.py, "Task buckets")."""
        chunks = [(stream, tasks[i:i + SUBMIT_BATCH]) for stream, tasks in groups.items()
                  for i in range(0, len(tasks), SUBMIT_BATCH)]
        done = await asyncio.gather(*(self._submit(tasks, stream) for stream, tasks in chunks))
        index = {stream: n for n, stream in enumerate(self.streams.task_streams)}
        rung = sorted({index[stream] for (stream, _), ok in zip(chunks, done) if ok})
        if rung:
            try:
                await self.store.run(self._ring, rung)
            except Exception as e:  # noqa: BLE001 - idle workers look at every bucket soon anyway
                log.debug("could not ring the tasks doorbell: %s", e)

    def _ring(self, buckets: list[int]) -> None:
        """(io thread) A bell per bucket in `buckets` on the doorbell (and its TTL), one round trip."""
        s = self.streams
        cmds: list[tuple[Any, ...]] = [("XADD", s.wake, "MAXLEN", "~", WAKE_MAXLEN, "*", "b", b) for b in buckets]
        if s.wake is not None and s.expire_due(s.wake):
            cmds.append(("EXPIRE", s.wake, s.ttl))
        for reply in self.backend.send_commands(cmds):
            if isinstance(reply, Exception):
                raise reply

    async def _submit(self, batch: list[WorkerTask], stream: str | None = None) -> bool:
        """One MULTI (XADD..., EXPIRE); a submit that fails answers each of its tasks with an error.
        True when the tasks are in."""
        stream = stream or self.streams.tasks
        cmds = self._submit_commands(batch, stream)
        try:
            if self.streams.sharded and not _pipelined(self.store):
                replies = await self.store.run(self._send_to_bucket, cmds)
            else:  # a pipelined store on a cluster resends a MULTI refused whole itself (redis_cluster_pipe.py)
                replies = await self.store.execute(cmds, what="submit tasks")
            _check_transaction(replies)
            return True
        except Exception as e:  # noqa: BLE001 - the callers get an error response
            log.error("could not submit %d task(s) to %s: %s", len(batch), stream, e)
            for task in batch:
                self._deliver(WorkerResult(task.task_id, error=f"could not submit the task: {e}",
                                           error_type=BACKEND_ERROR))
            return False

    def _send_to_bucket(self, cmds: list[tuple[Any, ...]]) -> list[Any]:
        """(io thread) A submit to a task bucket on a cluster. A MULTI that meets the bucket's slot
        being moved (a resharding) was refused whole, so it is sent again once the slot map is
        refreshed, for up to SUBMIT_MOVED_SECONDS; any other failure is the caller's (a lost
        connection may have applied it: not repeated, as on one server)."""
        give_up = time.monotonic() + SUBMIT_MOVED_SECONDS
        delay = 0.01
        while True:
            try:
                return self.backend.send_commands(cmds)
            except SlotMoving:
                if time.monotonic() + delay > give_up:
                    raise
                time.sleep(delay)
                delay = min(0.25, delay * 2)

    async def _read_results(self) -> None:
        """Read this pump's results stream until close(): XREAD BLOCK, with the XDEL of what the
        previous read consumed riding along; an outage is waited out with the Backoff."""
        s = self.streams
        last = "0-0"
        backoff = Backoff()
        consumed: list[Any] = []  # ids read but not deleted yet: the XDEL rides with the next XREAD
        while not self._stopping:
            cmds: list[tuple[Any, ...]] = []
            if consumed:
                cmds.append(("XDEL", self.results_key, *consumed))
            cmds.append(("XREAD", "COUNT", 256, "BLOCK", s.block_ms, "STREAMS", self.results_key, last))
            try:
                replies = await self.store.read(cmds, what="read results")
                consumed = []  # an error reply of XDEL is ignored: entries are tiny
                resp = replies[-1]
                if isinstance(resp, Exception):
                    raise resp
                backoff.reset()
            except BackendUnavailable as e:
                if self._stopping:
                    return
                await asyncio.sleep(backoff.retrying(log, f"results stream {self.results_key}", e))
                continue
            except Exception:  # noqa: BLE001 - the reader must survive anything
                log.exception("results stream %s: read failed", self.results_key)
                await asyncio.sleep(1.0)
                continue
            if not resp:
                continue
            results, last = _results_of(resp, consumed, last)
            for result in results:
                self._deliver(result)

    def _deliver(self, result: WorkerResult) -> None:
        fut = self._futures.get(result.task_id)
        if fut is None or fut.done():
            # A task that ran twice (its first worker stalled and came back): one response only.
            self.duplicates += 1
            log.info("dropped a duplicate result for task %s (from %s)", result.task_id, result.worker or "?")
            if result.response_key:
                dropping = asyncio.ensure_future(self._drop_response(result.response_key))
                self._sending.add(dropping)
                dropping.add_done_callback(self._sending.discard)
            return
        self.completed_ids.append(result.task_id)
        self.last_result = time.monotonic()
        fut.set_result(result)

    async def _drop_response(self, key: str) -> None:
        try:
            await self.store.delete(key)
        except Exception:  # noqa: BLE001 - it expires with the TTL anyway
            pass

    async def close(self) -> None:
        self._stopping = True
        if self._sending:
            await asyncio.gather(*self._sending, return_exceptions=True)
        if self._read_task is not None:
            self._read_task.cancel()
            await asyncio.gather(self._read_task, return_exceptions=True)
            self._read_task = None
        for task_id, fut in list(self._futures.items()):
            if not fut.done():
                fut.set_result(WorkerResult(task_id, error="the pump stopped before a worker answered",
                                            error_type=WORKER_DIED))
        try:
            await self.store.run(self.streams.client.delete, self.results_key)
        except redis.RedisError:
            pass
        if self._owns_store:
            self.store.close()
