"""Distributed mode: WorkerTasks through Redis Streams, for worker pods on any machine.

Streams (all under the organism's prefix, so tenants never meet):

    {prefix}tasks             WorkerTasks; consumer group "workers" (one consumer per worker process)
    {prefix}results:<pump>    WorkerResults for one pump process (it XREAD BLOCKs on it)
    {prefix}dlq               tasks that failed max_attempts times, with the last error
    {prefix}ingress           messages for the pump; consumer group "pump"
    {prefix}egress            every output of the pump (responses to external senders)
    {prefix}egress:sent:<id>  outputs of unfinished conversation <id> already on egress (a pump that
                              takes the conversation over does not write them again)

How a task stays safe:
- A worker takes a task with XREADGROUP; it stays in the group's pending list until the worker
  XACKs it (and XDELs it: the stream only holds unfinished tasks) in one MULTI with the result.
- While a task runs, a heartbeat thread re-claims it for its own consumer every heartbeat_seconds
  (XCLAIM ... JUSTID, only while it still owns it: a Lua script checks first), which resets its idle
  time. A worker that dies stops heartbeating; after claim_idle_seconds another worker's XAUTOCLAIM
  takes the task over. Long tasks of live workers are never stolen (heartbeat < claim idle).
- Failures: a handler error re-queues the task with failures+1; a death is counted by Redis
  (delivery count). When failures + deaths reach max_attempts the task goes to the dead-letter
  stream and the pump gets an error result — the caller still gets exactly one response.
- Exactly one response: a task may run twice (a stalled worker comes back after its task was
  reclaimed). The pump keeps a future per task id and takes the first result; a later duplicate
  is dropped and its response key deleted.
- A pump that dies mid-conversation leaves its ingress entry pending; every live pump sweeps the
  ingress stream with XAUTOCLAIM every claim_idle_seconds / 2 (not only at start), takes it over,
  runs the conversation again and writes only the outputs egress has not seen yet.
- Every task has a deadline (process_pool.task_deadline): a task whose result never comes (Redis
  lost it in a restart without persistence, say) is answered with a TaskDeadline error, so lost
  work never holds a pump's consumer or ingress slot.
- A worker supervisor (`xml-pipeline worker --processes N`) that sees a child die re-queues that
  child's pending tasks at once (release_consumer: the death counts as a failure, so a poison task
  reaches the dead-letter stream after max_attempts), instead of waiting for claim_idle_seconds.
- No polling: the pump blocks in XREAD on its results stream, workers in XREADGROUP.
- With a TTL, every stream gets the TTL on each write (EXPIRE in the same MULTI); a worker whose
  tasks stream expired while idle recreates the group (NOGROUP).
"""
from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import queue
import socket
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.typing import EncodableT, FieldT

from ..errors import BackendUnavailable
from ..memory.redis_pipe import RedisPipe
from ..memory.redis_scripts import LuaScript
from ..organism import Organism
from .worker_task import (
    BACKEND_ERROR,
    DEAD_LETTER,
    HANDLER_ERROR,
    TASK_DEADLINE,
    WORKER_DIED,
    Outcome,
    WorkerResult,
    WorkerTask,
    response_ttl,
    run_task,
)

log = logging.getLogger(__name__)

WORKER_GROUP = "workers"
PUMP_GROUP = "pump"
#: Outputs kept in the egress stream (approximate MAXLEN), dead letters kept in the dlq.
EGRESS_MAXLEN = 10_000
DLQ_MAXLEN = 10_000
RESULTS_MAXLEN = 100_000
#: Tasks the pump sends in one MULTI when many are waiting.
SUBMIT_BATCH = 256
#: Errors worth another attempt. Integrity failures and missing inputs will not get better.
RETRYABLE = frozenset({HANDLER_ERROR, BACKEND_ERROR, WORKER_DIED})
_REDIS_DOWN = (RedisConnectionError, RedisTimeoutError)
#: Outages a worker that is stopping sits through before it leaves a finished task to be reclaimed.
ESSENTIAL_ATTEMPTS = 8


# Re-claim a running task for its own consumer, only if that consumer still owns it.
_HEARTBEAT_LUA = """
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if #p == 0 or p[1][2] ~= ARGV[2] then return 0 end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'JUSTID')
return 1
"""

# Re-queue the tasks a dead consumer holds: a copy with failures+1 (the death counts) goes to the end
# of the stream and the original is acknowledged and deleted, atomically and only while the dead
# consumer still owns it (another worker's XAUTOCLAIM may have been first). A task that reached
# max_attempts goes to the dead-letter stream, and its pump gets a DeadLetter result.
# KEYS: tasks, dlq;  ARGV: group, consumer, max_attempts, ttl (0 = none), dlq maxlen, results prefix,
# results maxlen, worker name.  Returns {requeued, dead-lettered}.
_RELEASE_LUA = """
local requeued, dead = 0, 0
local ttl = tonumber(ARGV[4])
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1000, ARGV[2])
for _, p in ipairs(pending) do
  local id = p[1]
  local rows = redis.call('XRANGE', KEYS[1], id, id)
  redis.call('XACK', KEYS[1], ARGV[1], id)
  redis.call('XDEL', KEYS[1], id)
  if #rows == 1 then
    local f = rows[1][2]
    local failures, reply_to, task_id = 0, nil, ''
    for i = 1, #f, 2 do
      if f[i] == 'failures' then failures = tonumber(f[i + 1]) or 0 end
      if f[i] == 'reply_to' then reply_to = f[i + 1] end
      if f[i] == 'task_id' then task_id = f[i + 1] end
    end
    failures = failures + 1
    if failures >= tonumber(ARGV[3]) then
      local err = 'task failed ' .. failures .. ' time(s) (its workers died or stalled); moved to the dead-letter stream'
      local d = {}
      for i = 1, #f do d[#d + 1] = f[i] end
      for _, v in ipairs({'error', err, 'error_type', 'DeadLetter', 'entry_id', id, 'worker', ARGV[8]}) do
        d[#d + 1] = v
      end
      redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', unpack(d))
      if ttl > 0 then redis.call('EXPIRE', KEYS[2], ttl) end
      if reply_to and string.sub(reply_to, 1, #ARGV[6]) == ARGV[6] then
        redis.call('XADD', reply_to, 'MAXLEN', '~', ARGV[7], '*', 'task_id', task_id, 'response_key', '',
                   'error', err, 'error_type', 'DeadLetter', 'worker', ARGV[8])
        if ttl > 0 then redis.call('EXPIRE', reply_to, ttl) end
      end
      dead = dead + 1
    else
      for i = 1, #f, 2 do
        if f[i] == 'failures' then f[i + 1] = tostring(failures) end
      end
      redis.call('XADD', KEYS[1], '*', unpack(f))
      if ttl > 0 then redis.call('EXPIRE', KEYS[1], ttl) end
      requeued = requeued + 1
    end
  end
end
redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
return {requeued, dead}
"""


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _xfields(fields: dict[str, str]) -> dict[FieldT, EncodableT]:
    """`fields` typed as xadd wants it. redis-py asks for a dict of its wide key/value unions and a
    dict is invariant, so a dict[str, str] (a valid value) needs this cast; no copy is made."""
    return cast("dict[FieldT, EncodableT]", fields)


def _entries(resp: Any) -> list[tuple[Any, Any]]:
    """(id, fields) pairs of an XREAD/XREADGROUP reply, RESP2 (list) or RESP3 (map) shaped."""
    if not resp:
        return []
    streams = resp.items() if isinstance(resp, dict) else resp
    out: list[tuple[Any, Any]] = []
    for _key, entries in streams:
        out.extend((e[0], e[1]) for e in entries)
    return out


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


def consumer_name(role: str) -> str:
    """Unique per process and readable: <role>-<host>-<pid>-<random>."""
    return f"{role}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class Streams:
    """Key names of one organism's streams and the small Redis steps shared by pump and workers."""

    def __init__(self, backend: Any) -> None:
        if getattr(backend.config, "backend_type", None) != "redis" or not hasattr(backend, "client"):
            raise ValueError("distributed mode needs the redis backend")
        self.backend = backend
        self.client: redis.Redis = backend.client
        self.ttl: int | None = backend.config.ttl
        self.tasks = backend.key("tasks")
        self.dlq = backend.key("dlq")
        self.ingress = backend.key("ingress")
        self.egress = backend.key("egress")
        self.results_prefix = backend.key("results") + ":"
        # Blocking reads must return before the socket timeout fires.
        self.block_ms = max(50, min(1000, int(backend.config.socket_timeout * 500)))

    def results(self, pump_id: str) -> str:
        return self.backend.key("results", pump_id)

    def expire(self, pipe: Any, key: str) -> None:
        if self.ttl:
            pipe.expire(key, self.ttl)

    def ensure_group(self, stream: str, group: str) -> None:
        """Create the consumer group (and the stream) if missing; read from the stream's start."""
        pipe = self.client.pipeline(transaction=True)
        pipe.xgroup_create(stream, group, id="0", mkstream=True)
        self.expire(pipe, stream)
        results = pipe.execute(raise_on_error=False)
        err = results[0]
        if isinstance(err, Exception) and "BUSYGROUP" not in str(err):
            raise err


def _transaction(backend: Any, cmds: list[tuple[Any, ...]]) -> list[Any]:
    """Run MULTI ... EXEC `cmds` in one round trip (backend.send_commands); raise the first error
    (a refused command aborts the whole transaction, EXECABORT)."""
    return _check_transaction(backend.send_commands(cmds))


def _check_transaction(replies: list[Any]) -> list[Any]:
    """EXEC's reply of a MULTI ... EXEC's replies; raise the first error."""
    for r in replies:
        if isinstance(r, Exception):
            raise r
    exec_reply = replies[-1]
    if not isinstance(exec_reply, list):
        raise ResponseError(f"MULTI/EXEC returned {exec_reply!r}")
    for r in exec_reply:
        if isinstance(r, Exception):
            raise r
    return exec_reply


# ==================================================================================================
# Pump side: submit tasks, receive results
# ==================================================================================================
class RedisDispatcher:
    """The pump's Dispatcher in distributed mode: XADD tasks, XREAD BLOCK results (no polling).

    Tasks go out from the event loop through a RedisPipe (`pipelined`, the default on redis:// and
    unix:// URLs): the tasks submitted during one loop iteration share one MULTI, sent with the
    pipe's next write; otherwise a submit thread does the same from a queue."""

    def __init__(self, backend: Any, *, pump_id: str | None = None, pipelined: bool = True,
                 deadline: float | None = None) -> None:
        """`deadline`: seconds to wait for a task's result before answering it with a TaskDeadline
        error (None: wait forever); see process_pool.task_deadline."""
        self.streams = Streams(backend)
        self.deadline = deadline
        #: Tasks answered by the deadline, and when the last one was (health: are results overdue?).
        self.deadline_misses = 0
        self.last_miss = 0.0
        self.last_result = time.monotonic()
        self.backend = backend
        self.pump_id = pump_id or consumer_name("pump")
        self.results_key = self.streams.results(self.pump_id)
        self._futures: dict[str, asyncio.Future[WorkerResult]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = threading.Event()
        self._reader: threading.Thread | None = None
        self._submitter: threading.Thread | None = None
        self._outbox: queue.SimpleQueue[WorkerTask | None] = queue.SimpleQueue()
        self._pipe: RedisPipe | None = RedisPipe.for_backend(backend) if pipelined else None
        self._batch: list[WorkerTask] = []
        self._sending: set[asyncio.Task[None]] = set()
        #: With a pipe, results are read by a task of the event loop on a pipe of its own (XREAD BLOCK
        #: holds its connection), instead of a thread.
        self._read_pipe: RedisPipe | None = RedisPipe.for_backend(backend) if self._pipe is not None else None
        self._read_task: asyncio.Task[None] | None = None
        self.duplicates = 0
        #: Ids of the latest tasks answered (for logs and tests; dedupe itself uses the futures).
        self.completed_ids: collections.deque[str] = collections.deque(maxlen=1000)

    def describe(self) -> str:
        return f"Redis stream {self.streams.tasks} (worker pods, consumer group {WORKER_GROUP!r})"

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self._loop.run_in_executor(None, self.streams.ensure_group, self.streams.tasks, WORKER_GROUP)
        if self._read_pipe is not None:
            self._read_task = asyncio.ensure_future(self._read_results_piped())
        else:
            self._reader = threading.Thread(target=self._read_results, name="xp-results", daemon=True)
            self._reader.start()
        if self._pipe is None:
            self._submitter = threading.Thread(target=self._submit_loop, name="xp-submit", daemon=True)
            self._submitter.start()

    async def run(self, task: WorkerTask) -> WorkerResult:
        assert self._loop is not None, "start() the dispatcher first"
        task = WorkerTask(task.task_id, task.listener, task.handler, task.payload_key, task.metadata_key,
                          reply_to=self.results_key, failures=0)
        fut: asyncio.Future[WorkerResult] = self._loop.create_future()
        self._futures[task.task_id] = fut
        # A timer, not wait_for: no extra task per worker task on the hot path.
        timer = self._loop.call_later(self.deadline, self._expire, task) if self.deadline else None
        try:
            if self._pipe is None:
                self._outbox.put(task)
            else:
                self._batch.append(task)
                if len(self._batch) == 1:
                    self._loop.call_soon(self._submit_batch)
            return await fut
        finally:
            if timer is not None:
                timer.cancel()
            self._futures.pop(task.task_id, None)

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
                 f"{self.streams.tasks}")
        log.error("task %s (listener %s): %s", task.task_id, task.listener, error)
        fut.set_result(WorkerResult(task.task_id, error=error, error_type=TASK_DEADLINE))

    def overdue(self) -> str | None:
        """Why results are overdue (a task missed its deadline and no result came since), or None."""
        if self.deadline_misses and self.last_miss > self.last_result:
            return (f"results overdue: {self.deadline_misses} task(s) got no result within "
                    f"{self.deadline:g} s and no worker result has arrived since")
        return None

    def _submit_commands(self, batch: list[WorkerTask]) -> list[tuple[Any, ...]]:
        s = self.streams
        cmds: list[tuple[Any, ...]] = [("MULTI",)]
        cmds.extend(("XADD", s.tasks, "*", *(x for kv in task.to_fields().items() for x in kv)) for task in batch)
        if s.ttl:
            cmds.append(("EXPIRE", s.tasks, s.ttl))
        cmds.append(("EXEC",))
        return cmds

    def _submit_batch(self) -> None:
        """(loop) Everything submitted since the last call: one MULTI per SUBMIT_BATCH tasks."""
        batch, self._batch = self._batch, []
        for i in range(0, len(batch), SUBMIT_BATCH):
            sending = asyncio.ensure_future(self._submit_piped(batch[i:i + SUBMIT_BATCH]))
            self._sending.add(sending)
            sending.add_done_callback(self._sending.discard)

    async def _submit_piped(self, batch: list[WorkerTask]) -> None:
        assert self._pipe is not None
        cmds = self._submit_commands(batch)
        try:
            replies = await self._pipe.execute(self.backend.pack_commands(cmds), len(cmds), what="submit tasks")
            _check_transaction(replies)
        except Exception as e:  # noqa: BLE001 - the callers get an error response, as from the thread
            log.error("could not submit %d task(s) to %s: %s", len(batch), self.streams.tasks, e)
            for task in batch:
                self._deliver(WorkerResult(task.task_id, error=f"could not submit the task: {e}",
                                           error_type=BACKEND_ERROR))

    def _submit_loop(self) -> None:
        """Send queued tasks: everything waiting goes out in one MULTI (XADD..., EXPIRE)."""
        s = self.streams
        while True:
            first = self._outbox.get()
            if first is None:
                return
            batch = [first]
            stop = False
            while len(batch) < SUBMIT_BATCH:
                try:
                    nxt = self._outbox.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            cmds = self._submit_commands(batch)
            try:
                self.backend.execute(lambda _c: _transaction(self.backend, cmds), idempotent=False,
                                     what="submit tasks")
            except Exception as e:  # noqa: BLE001 - the callers get an error response
                log.error("could not submit %d task(s) to %s: %s", len(batch), s.tasks, e)
                assert self._loop is not None
                for task in batch:
                    self._loop.call_soon_threadsafe(self._deliver, WorkerResult(
                        task.task_id, error=f"could not submit the task: {e}", error_type=BACKEND_ERROR))
            if stop:
                return

    def _read_results(self) -> None:
        s = self.streams
        last = "0-0"
        backoff = 0.2
        consumed: list[Any] = []  # ids read but not deleted yet: the XDEL rides with the next XREAD
        # This thread's own connection (no pool checkout per read), where the URL allows it.
        direct = self.backend.new_direct_connection() if hasattr(self.backend, "new_direct_connection") else None
        try:
            while not self._stop.is_set():
                try:
                    cmds: list[tuple[Any, ...]] = []
                    if consumed:
                        cmds.append(("XDEL", self.results_key, *consumed))  # trim what we consumed
                    cmds.append(("XREAD", "COUNT", 256, "BLOCK", s.block_ms, "STREAMS", self.results_key, last))
                    if direct is not None:
                        replies = direct.pipeline(self.backend.pack_commands(cmds), len(cmds))
                    else:
                        replies = self.backend.send_commands(cmds)
                    consumed = []  # an error reply of XDEL is ignored, as before: entries are tiny
                    resp = replies[-1]
                    if isinstance(resp, Exception):
                        raise resp
                    backoff = 0.2
                except _REDIS_DOWN as e:
                    log.warning("results stream %s: Redis unavailable (%s); retrying in %.1f s",
                                self.results_key, type(e).__name__, backoff)
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, 5.0)
                    continue
                except Exception:  # noqa: BLE001 - the reader must survive anything
                    log.exception("results stream %s: read failed", self.results_key)
                    self._stop.wait(1.0)
                    continue
                if not resp:
                    continue
                results, last = _results_of(resp, consumed, last)
                assert self._loop is not None
                self._loop.call_soon_threadsafe(self._deliver_all, results)  # one wake-up per batch
        finally:
            if direct is not None:
                direct.disconnect()

    async def _read_results_piped(self) -> None:
        """_read_results as a task of the event loop: the same commands, the same recovery."""
        s = self.streams
        pipe = self._read_pipe
        assert pipe is not None
        last = "0-0"
        backoff = 0.2
        consumed: list[Any] = []
        while not self._stop.is_set():
            cmds: list[tuple[Any, ...]] = []
            if consumed:
                cmds.append(("XDEL", self.results_key, *consumed))
            cmds.append(("XREAD", "COUNT", 256, "BLOCK", s.block_ms, "STREAMS", self.results_key, last))
            try:
                replies = await pipe.execute(self.backend.pack_commands(cmds), len(cmds), what="read results")
                consumed = []
                resp = replies[-1]
                if isinstance(resp, Exception):
                    raise resp
                backoff = 0.2
            except BackendUnavailable as e:
                if self._stop.is_set():
                    return
                log.warning("results stream %s: Redis unavailable (%s); retrying in %.1f s",
                            self.results_key, e, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            except Exception:  # noqa: BLE001 - the reader must survive anything
                log.exception("results stream %s: read failed", self.results_key)
                await asyncio.sleep(1.0)
                continue
            results, last = _results_of(resp, consumed, last)
            for result in results:
                self._deliver(result)

    def _deliver_all(self, results: list[WorkerResult]) -> None:
        for result in results:
            self._deliver(result)

    def _deliver(self, result: WorkerResult) -> None:
        fut = self._futures.get(result.task_id)
        if fut is None or fut.done():
            # A task that ran twice (its first worker stalled and came back): one response only.
            self.duplicates += 1
            log.info("dropped a duplicate result for task %s (from %s)", result.task_id, result.worker or "?")
            if result.response_key:
                assert self._loop is not None
                self._loop.run_in_executor(None, self._drop_response, result.response_key)
            return
        self.completed_ids.append(result.task_id)
        self.last_result = time.monotonic()
        fut.set_result(result)

    def _drop_response(self, key: str) -> None:
        try:
            self.backend.temp_delete(key)
        except Exception:  # noqa: BLE001 - it expires with the TTL anyway
            pass

    async def close(self) -> None:
        self._stop.set()
        self._outbox.put(None)
        if self._sending:
            await asyncio.gather(*self._sending, return_exceptions=True)
        if self._pipe is not None:
            self._pipe.close()
        if self._read_task is not None:
            self._read_task.cancel()
            await asyncio.gather(self._read_task, return_exceptions=True)
        if self._read_pipe is not None:
            self._read_pipe.close()
        for task_id, fut in list(self._futures.items()):
            if not fut.done():
                fut.set_result(WorkerResult(task_id, error="the pump stopped before a worker answered",
                                            error_type=WORKER_DIED))
        loop = asyncio.get_running_loop()
        for t in (self._submitter, self._reader):
            if t is not None:
                await loop.run_in_executor(None, t.join, 5.0)
        try:
            self.streams.client.delete(self.results_key)
        except redis.RedisError:
            pass


# ==================================================================================================
# Worker side: the loop of `xml-pipeline worker`
# ==================================================================================================
class DistributedWorker:
    """One consumer of the tasks stream. `run()` blocks until `request_stop()` (SIGTERM)."""

    def __init__(self, backend: Any, organism: Organism, *, name: str | None = None,
                 heartbeat_file: str | None = None, parent_pid: int | None = None) -> None:
        self.streams = Streams(backend)
        self.backend = backend
        self.organism = organism
        self.name = name or consumer_name("worker")
        pool = organism.process_pool
        self.max_attempts = pool.max_attempts
        self.claim_idle_ms = int(pool.claim_idle_seconds * 1000)
        self.heartbeat_s = pool.heartbeat_seconds
        self.heartbeat_file = heartbeat_file
        self.parent_pid = parent_pid
        self._handlers = {ls.name: ls.handler for ls in organism.listeners if ls.cpu_bound}
        self._stop = threading.Event()
        self._claim_cursor = "0-0"
        self.completed = 0
        self.current: str | None = None
        self._entry: str | None = None  # stream entry of the task in hand (the heartbeat re-claims it)
        self._next: tuple[str, dict[Any, Any], int] | None = None  # read along with the last result
        self._next_claim = 0.0
        self._beat_stop = threading.Event()

    def request_stop(self) -> None:
        """Finish the task in hand, then return from run() (SIGTERM)."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def run(self) -> None:
        s = self.streams
        log.info("worker %s: consuming %s (group %s), claim idle %.1f s, heartbeat %.1f s, max attempts %d",
                 self.name, s.tasks, WORKER_GROUP, self.claim_idle_ms / 1000, self.heartbeat_s, self.max_attempts)
        self._with_redis(lambda: s.ensure_group(s.tasks, WORKER_GROUP))
        # The task loop runs in this thread: its batched commands skip the connection pool (the
        # heartbeat thread keeps using the pool).
        direct = getattr(self.backend, "use_direct_connection", None)
        if direct is not None:
            direct()
        beat = threading.Thread(target=self._heartbeat_loop, name="xp-heartbeat", daemon=True)
        beat.start()
        try:
            self._loop()
        finally:
            self._beat_stop.set()
            beat.join()
        self._leave()
        log.info("worker %s: stopped after %d task(s)", self.name, self.completed)

    def _loop(self) -> None:
        self._next_claim = 0.0
        while not self._stop.is_set():
            self.touch()
            if self.parent_pid is not None and os.getppid() != self.parent_pid:
                log.warning("worker %s: parent process is gone; exiting", self.name)
                break
            # A task read in the same round trip as the previous task's result (see _finish).
            entry, self._next = self._next, None
            if entry is None and time.monotonic() >= self._next_claim:
                entry = self._with_redis(self._reclaim_one)
                if entry is None:
                    self._next_claim = time.monotonic() + max(0.05, self.claim_idle_ms / 2000)
            if entry is None:
                entry = self._with_redis(self._read_one)
            if entry is not None:
                self._handle(*entry)
        if self._next is not None:
            # Stopped while the chained read was waiting and it brought a task: run it, as a task
            # returned by a plain read is run (draining means finishing what we took).
            entry, self._next = self._next, None
            self._handle(*entry)

    def touch(self) -> None:
        if self.heartbeat_file:
            touch(self.heartbeat_file)

    # -- Redis steps ------------------------------------------------------------------------------------
    def _with_redis(self, fn: Callable[[], Any], *, essential: bool = False) -> Any:
        """Run one Redis step; on an outage, retry with backoff.

        Reads give up as soon as a stop is requested. `essential` steps (handing in a finished
        task's result) are tried even while stopping — that is what draining means — and give up
        only after ESSENTIAL_ATTEMPTS outages; the task then stays pending and is reclaimed.
        """
        backoff = 0.2
        attempts = 0
        while True:
            if self._stop.is_set() and not essential:
                return None
            try:
                return fn()
            except _REDIS_DOWN as e:
                attempts += 1
                log.warning("worker %s: Redis unavailable (%s: %s); retrying in %.1f s",
                            self.name, type(e).__name__, e, backoff)
                if essential and self._stop.is_set() and attempts >= ESSENTIAL_ATTEMPTS:
                    log.error("worker %s: giving up on Redis while stopping; the task stays pending and "
                              "another worker will reclaim it", self.name)
                    return None
            except ResponseError as e:
                if "NOGROUP" not in str(e):
                    raise
                # The stream expired (TTL) or was deleted while idle: recreate the group.
                log.info("worker %s: consumer group missing (%s); recreating it", self.name, e)
                self.streams.ensure_group(self.streams.tasks, WORKER_GROUP)
                continue
            if essential:
                time.sleep(backoff)
            else:
                self._stop.wait(backoff)
            backoff = min(backoff * 2, 5.0)

    def _read_one(self) -> tuple[str, dict[Any, Any], int] | None:
        s = self.streams
        resp = s.client.xreadgroup(WORKER_GROUP, self.name, {s.tasks: ">"}, count=1, block=s.block_ms)
        for entry_id, fields in _entries(resp):
            return _s(entry_id), fields, 1
        return None

    def _reclaim_one(self) -> tuple[str, dict[Any, Any], int] | None:
        """Take over one task whose worker has been silent for claim_idle (it died)."""
        s = self.streams
        resp = s.client.xautoclaim(s.tasks, WORKER_GROUP, self.name, self.claim_idle_ms,
                                   start_id=self._claim_cursor, count=1)
        cursor, entries = _s(resp[0]), resp[1]
        self._claim_cursor = cursor
        for entry_id, fields in entries:
            if not fields:
                continue
            eid = _s(entry_id)
            pending = s.client.xpending_range(s.tasks, WORKER_GROUP, min=eid, max=eid, count=1)
            deliveries = int(pending[0]["times_delivered"]) if pending else 2
            log.warning("worker %s: reclaimed task entry %s (delivered %d times; its worker went silent)",
                        self.name, eid, deliveries)
            return eid, fields, deliveries
        return None

    def _heartbeat_loop(self) -> None:
        """One thread per worker: every heartbeat_seconds, refresh the heartbeat file and re-claim
        the task in hand (resetting its idle time), so a long task is not taken over."""
        s = self.streams
        warned: str | None = None
        while not self._beat_stop.wait(self.heartbeat_s):
            self.touch()
            if self.parent_pid is not None and os.getppid() != self.parent_pid:
                log.error("worker %s: parent process is gone; exiting", self.name)
                os._exit(1)
            entry_id = self._entry
            if entry_id is None or entry_id == warned:
                continue
            try:
                # run_script reloads a script Redis forgot (restart, SCRIPT FLUSH) and runs it again.
                owned = self.backend.run_script(HEARTBEAT, (s.tasks,), (WORKER_GROUP, self.name, entry_id))
                if not owned and self._entry == entry_id:
                    warned = entry_id
                    log.warning("worker %s: task entry %s was reclaimed by another worker; the pump "
                                "keeps only the first result", self.name, entry_id)
            except redis.RedisError as e:
                log.warning("worker %s: heartbeat for %s failed: %s", self.name, entry_id, e)

    def _handle(self, entry_id: str, fields: dict[Any, Any], deliveries: int) -> None:
        try:
            task = WorkerTask.from_fields(fields)
        except ValueError as e:
            log.error("worker %s: dropping malformed task entry %s: %s", self.name, entry_id, e)
            reason = f"malformed task: {e}"  # bound now: `e` is unbound once the except block ends
            self._with_redis(lambda: self._dead_letter(entry_id, None, {_s(k): _s(v) for k, v in fields.items()},
                                                      reason), essential=True)
            return
        if not task.reply_to.startswith(self.streams.results_prefix):
            log.error("worker %s: task %s names a reply stream outside this organism (%r); dead-lettered",
                      self.name, task.task_id, task.reply_to)
            self._with_redis(lambda: self._dead_letter(entry_id, None, task.to_fields(), "foreign reply_to"),
                             essential=True)
            return
        prior = task.failures + max(0, deliveries - 1)
        if prior >= self.max_attempts:
            error = (f"task failed {prior} time(s) (its workers died or stalled); "
                     f"moved to the dead-letter stream {self.streams.dlq}")
            log.error("worker %s: task %s (listener %s): %s", self.name, task.task_id, task.listener, error)
            self._with_redis(lambda: self._dead_letter(entry_id, task, task.to_fields(), error), essential=True)
            return
        expected = self._handlers.get(task.listener)
        if expected is None or expected != task.handler:
            result = WorkerResult(task.task_id, error=f"listener {task.listener!r} with handler {task.handler!r} "
                                  f"is not a cpu_bound listener of organism {self.organism.name!r} here",
                                  error_type="UnknownListener", worker=self.name)
            outcome = Outcome(result)
        else:
            self.current, self._entry = task.task_id, entry_id
            try:
                outcome = run_task(self.backend, task, worker=self.name)
            finally:
                self.current = self._entry = None
            result = outcome.result
        if result.ok:
            # Response, result and acknowledgement in one MULTI: one round trip, all or nothing.
            self._with_redis(lambda: self._finish(entry_id, task, outcome), essential=True)
            self.completed += 1
        elif result.error_type in RETRYABLE and prior + 1 < self.max_attempts:
            log.warning("worker %s: task %s failed (attempt %d of %d): %s; re-queued", self.name, task.task_id,
                        prior + 1, self.max_attempts, result.error)
            self._with_redis(lambda: self._requeue(entry_id, task, prior + 1), essential=True)
        else:
            attempts = prior + 1
            error = (f"{result.error} (failed {attempts} time(s); moved to the dead-letter stream "
                     f"{self.streams.dlq})")
            self._with_redis(lambda: self._dead_letter(entry_id, task, task.to_fields(), error,
                                                      error_type=result.error_type), essential=True)

    def _finish(self, entry_id: str, task: WorkerTask, outcome: Outcome) -> None:
        """Response, result, XACK and XDEL in one MULTI; in the same round trip (after EXEC, outside
        the transaction) the XREADGROUP for the next task, unless the worker is stopping or a
        reclaim is due. One write, two replies read: the same commands as before, one round trip
        less per task, and without redis-py's pipeline machinery (its CPU cost per task was larger
        than the round trip's)."""
        s = self.streams
        cmds: list[tuple[Any, ...]] = [("MULTI",)]
        if outcome.response is not None:
            key, blob = outcome.response
            cmds.append(("SET", self.backend.keys.tmp(key), blob, "EX", response_ttl(self.backend)))
        fields = outcome.result.to_fields()
        cmds.append(("XADD", task.reply_to, "MAXLEN", "~", RESULTS_MAXLEN, "*",
                      *(x for kv in fields.items() for x in kv)))
        if s.ttl:
            cmds.append(("EXPIRE", task.reply_to, s.ttl))
        cmds.append(("XACK", s.tasks, WORKER_GROUP, entry_id))
        cmds.append(("XDEL", s.tasks, entry_id))
        cmds.append(("EXEC",))
        chain = not self._stop.is_set() and time.monotonic() < self._next_claim
        if chain:
            cmds.append(("XREADGROUP", "GROUP", WORKER_GROUP, self.name, "COUNT", 1, "BLOCK", s.block_ms,
                         "STREAMS", s.tasks, ">"))
        # The read's reply is best effort: if the connection fails after EXEC's reply, the result
        # is in and _finish must not be repeated (that would send the result twice).
        replies = self.backend.send_commands(cmds, best_effort_tail=1 if chain else 0)
        exec_reply = replies[len(cmds) - 2] if chain else replies[-1]
        for r in replies[:len(cmds) - (1 if chain else 0)]:
            if isinstance(r, Exception):  # a refused command or EXECABORT: nothing was applied
                raise r
        if not isinstance(exec_reply, list):
            raise ResponseError(f"MULTI/EXEC for task {task.task_id} returned {exec_reply!r}")
        for r in exec_reply:
            if isinstance(r, Exception):
                raise r
        if chain:
            read = replies[-1]
            if isinstance(read, Exception):
                # The result is in; a failed read (NOGROUP after the stream expired, say) is left
                # to the loop's own read, which knows how to recover.
                log.debug("worker %s: chained read failed: %s", self.name, read)
                return
            for eid, flds in _entries(read):
                if isinstance(flds, list):
                    flds = dict(zip(flds[::2], flds[1::2]))
                self._next = (_s(eid), flds, 1)
                break

    def _requeue(self, entry_id: str, task: WorkerTask, failures: int) -> None:
        s = self.streams
        again = WorkerTask(task.task_id, task.listener, task.handler, task.payload_key, task.metadata_key,
                           reply_to=task.reply_to, failures=failures)
        pipe = s.client.pipeline(transaction=True)
        pipe.xadd(s.tasks, _xfields(again.to_fields()))
        s.expire(pipe, s.tasks)
        pipe.xack(s.tasks, WORKER_GROUP, entry_id)
        pipe.xdel(s.tasks, entry_id)
        pipe.execute()

    def _dead_letter(self, entry_id: str, task: WorkerTask | None, fields: dict[str, str], error: str,
                     *, error_type: str | None = None) -> None:
        s = self.streams
        pipe = s.client.pipeline(transaction=True)
        dead = dict(fields, error=error, error_type=error_type or DEAD_LETTER, entry_id=entry_id,
                    worker=self.name, failed_at=str(time.time()))
        pipe.xadd(s.dlq, _xfields(dead), maxlen=DLQ_MAXLEN, approximate=True)
        s.expire(pipe, s.dlq)
        if task is not None and task.reply_to.startswith(s.results_prefix):
            res = WorkerResult(task.task_id, error=error, error_type=DEAD_LETTER, worker=self.name)
            pipe.xadd(task.reply_to, _xfields(res.to_fields()), maxlen=RESULTS_MAXLEN, approximate=True)
            s.expire(pipe, task.reply_to)
        pipe.xack(s.tasks, WORKER_GROUP, entry_id)
        pipe.xdel(s.tasks, entry_id)
        pipe.execute()

    def _leave(self) -> None:
        """Remove this consumer from the group if it holds no pending task."""
        s = self.streams
        try:
            pending = s.client.xpending_range(s.tasks, WORKER_GROUP, min="-", max="+", count=1,
                                              consumername=self.name)
            if not pending:
                s.client.xgroup_delconsumer(s.tasks, WORKER_GROUP, self.name)
        except redis.RedisError:
            pass


def release_consumer(backend: Any, consumer: str, *, max_attempts: int, by: str = "supervisor") -> tuple[int, int]:
    """Re-queue the tasks `consumer` (a worker that died) holds and remove it from the group: the
    death counts as a failure; a task at max_attempts goes to the dead-letter stream and its pump
    gets a DeadLetter result. Returns (re-queued, dead-lettered)."""
    s = Streams(backend)
    try:
        requeued, dead = backend.run_script(RELEASE, (s.tasks, s.dlq),
                                            (WORKER_GROUP, consumer, max_attempts, s.ttl or 0, DLQ_MAXLEN,
                                             s.results_prefix, RESULTS_MAXLEN, by))
    except ResponseError as e:
        if "NOGROUP" in str(e):  # no tasks stream (expired, or Redis lost it): nothing to release
            return 0, 0
        raise
    return int(requeued), int(dead)


def touch(path: str, status: str | None = None) -> None:
    """Refresh a heartbeat file (`xml-pipeline healthcheck` checks its age). `status`: the file's
    new content ("" = healthy, else why not; the healthcheck prints it and fails); None keeps it."""
    p = Path(path)

    def write() -> None:
        if status is None:
            p.touch()
        else:  # whole or not at all: the probe never reads half a status
            tmp = p.with_name(p.name + ".tmp")
            tmp.write_text(status)
            os.replace(tmp, p)

    try:
        write()
    except FileNotFoundError:
        p.parent.mkdir(parents=True, exist_ok=True)
        write()
    except OSError as e:  # a read-only /tmp must not kill the worker; the probe will say so
        log.debug("cannot touch heartbeat file %s: %s", path, e)


def dead_letters(backend: Any, count: int = 100) -> list[dict[str, str]]:
    """The newest entries of the dead-letter stream (for inspection and tests)."""
    s = Streams(backend)
    # redis-py's stub allows a nil reply and nil fields; XREVRANGE sends an array (empty for a missing
    # stream) of entries that all have fields, so `or` only narrows the type.
    rows = s.client.xrevrange(s.dlq, count=count) or []
    return [{**{_s(k): _s(v) for k, v in (f or {}).items()}, "_id": _s(i)} for i, f in rows]


def stream_info(backend: Any) -> dict[str, Any]:
    """Lengths and pending counts of the organism's streams."""
    s = Streams(backend)
    out: dict[str, Any] = {}
    for name, key, group in (("tasks", s.tasks, WORKER_GROUP), ("ingress", s.ingress, PUMP_GROUP),
                             ("egress", s.egress, None), ("dlq", s.dlq, None)):
        try:
            length = s.client.xlen(key)
            pending = None
            if group and length is not None:
                try:
                    pending = s.client.xpending(key, group).get("pending")
                except ResponseError:
                    pending = None
            out[name] = {"length": length, "pending": pending} if group else {"length": length}
        except redis.RedisError as e:
            out[name] = {"error": str(e)}
    return json.loads(json.dumps(out))


# The pump pod's side (ingress → StreamPump → egress) and `xml-pipeline send` live in ingress.py;
# imported here last (ingress.py builds on this module) so both keep one import path.
from .ingress import EGRESS_ONCE, IngressBridge as IngressBridge, send_message as send_message  # noqa: E402

#: The Lua scripts of the pump and the workers (memory.redis_functions puts them into the Redis
#: Functions library beside the backend's, so a tenant on a shared Redis can FCALL them).
HEARTBEAT = LuaScript("heartbeat", 1, 3, _HEARTBEAT_LUA)
RELEASE = LuaScript("release", 2, 8, _RELEASE_LUA)
SCRIPTS: tuple[LuaScript, ...] = (EGRESS_ONCE, HEARTBEAT, RELEASE)
