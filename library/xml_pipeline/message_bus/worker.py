"""The worker side of distributed mode: the loop of `xml-pipeline worker` (DistributedWorker), the
supervisor's release of a dead child's tasks (release_consumer) and the heartbeat file (touch).
streams.py describes the streams and how a task stays safe."""
from __future__ import annotations

import collections
import logging
import os
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis
from redis.exceptions import ResponseError

from ..organism import Organism
from .retry import _REDIS_DOWN, Backoff, transient_reply
from .streams import (
    DLQ_MAXLEN,
    HEARTBEAT,
    RELEASE,
    RESULTS_MAXLEN,
    SHARDED_IDLE_BLOCK_MS,
    WORKER_GROUP,
    Streams,
    _check_transaction,
    _entries,
    _s,
    _xfields,
    consumer_name,
)
from .worker_task import (
    BACKEND_ERROR,
    DEAD_LETTER,
    HANDLER_ERROR,
    WORKER_DIED,
    Outcome,
    WorkerResult,
    WorkerTask,
    response_ttl,
    run_task,
)

if TYPE_CHECKING:
    from ..memory.redis_backend import RedisBackend

log = logging.getLogger(__name__)

#: Errors worth another attempt. Integrity failures and missing inputs will not get better.
RETRYABLE = frozenset({HANDLER_ERROR, BACKEND_ERROR, WORKER_DIED})
#: Outages a worker that is stopping sits through before it leaves a finished task to be reclaimed.
ESSENTIAL_ATTEMPTS = 8
#: max_attempts given to the release script on a sharded tasks stream: it never dead-letters there
#: (the result stream is in another slot); the next reader does (streams.py, "Task buckets").
_NEVER = 2**31 - 1

#: A task in hand: (bucket index, stream entry id, fields, times delivered).
Entry = tuple[int, str, dict[Any, Any], int]
#: On a sharded tasks stream, how many tasks in a row a worker reads from one bucket in the round
#: trip of the previous one's acknowledgement before it moves on to the next bucket: a round trip
#: saved per task under load, while every bucket still gets its turn.
CHAINED_PER_BUCKET = 4
#: One tasks stream (one server, Sentinel): while tasks run short, a worker reads up to MAX_BATCH
#: at once and hands in their results and acknowledgements in one MULTI (with the next read in the
#: same round trip), so a round trip serves a batch instead of one task. A batch is sized so its
#: tasks are expected to run within BATCH_SECONDS in all (from the worker's recent run times), and
#: results are handed in once BATCH_SECONDS have passed. Before a task whose listener runs longer
#: than BATCH_SECONDS (as far as this worker has seen; a listener it has not run yet counts as long)
#: the results are handed in and the tasks read behind it are given back to the stream for other
#: workers; a task that runs long against its listener's habit holds back the ones behind it (kept
#: by the heartbeat meanwhile) and the results before it for its run.
#: A batch forms only when tasks wait in the stream (a read returns what is there), so the time a
#: result may wait for its batch's others is spent under a backlog, where the task would have waited
#: for a worker anyway.
MAX_BATCH = 8
BATCH_SECONDS = 0.01
#: The heartbeat file is refreshed at most this often (`xml-pipeline healthcheck --max-age`: 30 s by default).
TOUCH_SECONDS = 1.0


class DistributedWorker:
    """One consumer of the tasks stream (of every task bucket, on a cluster). `run()` blocks until
    `request_stop()` (SIGTERM). `tasks_buckets`: see Streams (the pumps must use the same number).

    (Over 500 lines: the read, batch, claim, heartbeat, result and dead-letter steps share the
    worker's state — the tasks in hand, the batch, the bucket cursor — and serve one stream and the
    cluster's task buckets alike; split by mode, each would exist twice.)"""

    def __init__(self, backend: RedisBackend, organism: Organism, *, name: str | None = None,
                 heartbeat_file: str | None = None, parent_pid: int | None = None,
                 tasks_buckets: int | None = None) -> None:
        self.streams = Streams(backend, buckets=tasks_buckets)
        buckets = len(self.streams.task_streams)
        # Where the next look for a task starts (the bucket after the last one served) and the
        # XAUTOCLAIM cursor of each bucket.
        self._cursor = random.randrange(buckets)
        self._claim_bucket = 0
        self._claim_cursors = ["0-0"] * buckets
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
        self.completed = 0
        self.current: str | None = None
        # (stream, entry id) of the task in hand (the heartbeat re-claims it)
        self._entry: tuple[str, str] | None = None
        # Tasks read and not started yet (read along with the last results, or a batch).
        self._queue: collections.deque[Entry] = collections.deque()
        # One tasks stream: tasks run and not handed in yet (entry id, task, outcome), and since when.
        self._done: list[tuple[str, WorkerTask, Outcome]] = []
        self._done_since = 0.0
        # Entry ids in hand besides the running one (queued or done), for the heartbeat: a tuple
        # replaced whole, so the heartbeat thread reads it without a lock.
        self._held: tuple[tuple[str, str], ...] = ()
        self._run_avg = BATCH_SECONDS  # recent run time per task (moving average), sizes a batch
        self._listener_avg: dict[str, float] = {}  # the same per listener: is the next task long?
        self._touched = float("-inf")  # when the heartbeat file was last refreshed
        self._chained = 0  # tasks read in a row from one bucket along with an acknowledgement
        self._look = True  # look at every bucket before waiting on the doorbell
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
                 self.name, s.describe_tasks(), WORKER_GROUP, self.claim_idle_ms / 1000, self.heartbeat_s,
                 self.max_attempts)
        self._with_redis(s.ensure_task_groups)
        # The task loop runs in this thread: its batched commands skip the connection pool (the
        # heartbeat thread keeps using the pool).
        self.backend.use_direct_connection()
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
            # A task read in the same round trip as earlier results (see _finish), or in a batch.
            entry = self._queue.popleft() if self._queue else None
            if entry is None and time.monotonic() >= self._next_claim:
                entry = self._with_redis(self._reclaim_one)
                if entry is None:
                    self._next_claim = time.monotonic() + max(0.05, self.claim_idle_ms / 2000)
            if entry is None:
                entry = self._with_redis(self._read_one)
            if entry is not None:
                self._handle(*entry)
            self._hand_in(final=False)
        # Stopped: what was read is run and handed in (draining means finishing what we took).
        while self._queue:
            self._handle(*self._queue.popleft())
        self._hand_in(final=True)

    def _hand_in(self, *, final: bool) -> None:
        """Hand in the tasks run and not handed in yet, in one MULTI, when nothing read waits or
        the batch's time is up (always when `final`); the next read rides along unless `final`."""
        streams = self.streams.task_streams
        self._held = tuple((streams[e[0]], e[1]) for e in self._queue) + tuple((streams[0], d[0]) for d in self._done)
        if not self._done or not (final or not self._queue
                                  or time.monotonic() - self._done_since >= BATCH_SECONDS):
            return
        done, self._done = self._done, []
        self._with_redis(lambda: self._finish(done, chain=not final and not self._queue), essential=True)
        self._held = tuple((streams[e[0]], e[1]) for e in self._queue)

    def touch(self) -> None:
        """Refresh the heartbeat file, at most once per TOUCH_SECONDS (the task loop passes here
        once per task: a file's mtime every few milliseconds says no more than once a second)."""
        if self.heartbeat_file:
            now = time.monotonic()
            if now - self._touched >= TOUCH_SECONDS:
                self._touched = now
                touch(self.heartbeat_file)

    # -- Redis steps ------------------------------------------------------------------------------------
    def _with_redis(self, fn: Callable[[], Any], *, essential: bool = False) -> Any:
        """Run one Redis step; on an outage, retry with backoff.

        Reads give up as soon as a stop is requested. `essential` steps (handing in a finished
        task's result) are tried even while stopping — that is what draining means — and give up
        only after ESSENTIAL_ATTEMPTS outages; the task then stays pending and is reclaimed.
        """
        backoff = Backoff()
        attempts = 0
        while True:
            if self._stop.is_set() and not essential:
                return None
            try:
                return fn()
            except _REDIS_DOWN as e:
                attempts += 1
                delay = backoff.retrying(log, f"worker {self.name}", f"{type(e).__name__}: {e}")
                if essential and self._stop.is_set() and attempts >= ESSENTIAL_ATTEMPTS:
                    log.error("worker %s: giving up on Redis while stopping; the task stays pending and "
                              "another worker will reclaim it", self.name)
                    return None
            except ResponseError as e:
                if transient_reply(e):  # e.g. the tasks stream moved to another node (resharding)
                    attempts += 1
                    delay = backoff.retrying(log, f"worker {self.name}", f"{type(e).__name__}: {e}")
                elif "NOGROUP" not in str(e):
                    raise
                else:
                    # The stream expired (TTL) or was deleted while idle: recreate the group.
                    log.info("worker %s: consumer group missing (%s); recreating it", self.name, e)
                    self.streams.ensure_task_groups()
                    continue
            if essential:
                time.sleep(delay)
            else:
                self._stop.wait(delay)

    def _batch_size(self) -> int:
        """How many tasks to read at once from one tasks stream: as many as are expected to run
        within BATCH_SECONDS (at least one, at most MAX_BATCH)."""
        return max(1, min(MAX_BATCH, int(BATCH_SECONDS / max(self._run_avg, 1e-6))))

    def _batch(self, resp: Any) -> Entry | None:
        """The first task of an XREADGROUP reply on the tasks stream; the others are queued."""
        entries: list[Entry] = []
        for entry_id, fields in _entries(resp):
            if isinstance(fields, list):
                fields = dict(zip(fields[::2], fields[1::2]))
            entries.append((0, _s(entry_id), fields, 1))
        if not entries:
            return None
        self._queue.extend(entries[1:])
        return entries[0]

    def _first(self, bucket: int, resp: Any) -> Entry | None:
        for entry_id, fields in _entries(resp):
            if isinstance(fields, list):
                fields = dict(zip(fields[::2], fields[1::2]))
            return bucket, _s(entry_id), fields, 1
        return None

    def _read_one(self) -> Entry | None:
        s = self.streams
        if not s.sharded:
            return self._batch(s.client.xreadgroup(WORKER_GROUP, self.name, {s.tasks: ">"}, count=self._batch_size(),
                                                   block=s.block_ms))
        # streams.py, "Task buckets": every bucket in turn from the one after the last served; when
        # idle, the doorbell.
        wake = s.wake
        assert wake is not None  # sharded
        n = len(s.task_streams)
        if self._look:
            for i in range(n):
                got = self._take((self._cursor + i) % n)
                if got is not None:
                    return got
        resp = s.client.xreadgroup(WORKER_GROUP, self.name, {wake: ">"}, count=1, block=SHARDED_IDLE_BLOCK_MS,
                                   noack=True)
        bells = _entries(resp)
        # No bell within the wait: look at every bucket next time (a bell may have failed). A bell:
        # its bucket; if another worker was first, back to the doorbell.
        self._look = not bells
        for _, fields in bells:
            if isinstance(fields, list):
                fields = dict(zip(fields[::2], fields[1::2]))
            named = _s(fields.get(b"b", fields.get("b", b"")))
            if named.isdigit() and int(named) < n:
                return self._take(int(named))
        return None

    def _take(self, bucket: int) -> Entry | None:
        """One task of `bucket` without blocking; the next look starts after it."""
        s = self.streams
        got = self._first(bucket, s.client.xreadgroup(WORKER_GROUP, self.name, {s.task_streams[bucket]: ">"},
                                                      count=1))
        if got is not None:
            self._cursor = (bucket + 1) % len(s.task_streams)
            self._look = True
        return got

    def _reclaim_one(self) -> Entry | None:
        """Take over one task whose worker has been silent for claim_idle (it died), from any bucket."""
        n = len(self.streams.task_streams)
        for i in range(n):
            b = (self._claim_bucket + i) % n
            got = self._reclaim_in(b)
            if got is not None:
                self._claim_bucket = b
                return got
        return None

    def _reclaim_in(self, bucket: int) -> Entry | None:
        s = self.streams
        stream = s.task_streams[bucket]
        resp = s.client.xautoclaim(stream, WORKER_GROUP, self.name, self.claim_idle_ms,
                                   start_id=self._claim_cursors[bucket], count=1)
        cursor, entries = _s(resp[0]), resp[1]
        self._claim_cursors[bucket] = cursor
        for entry_id, fields in entries:
            if not fields:
                continue
            eid = _s(entry_id)
            pending = s.client.xpending_range(stream, WORKER_GROUP, min=eid, max=eid, count=1)
            deliveries = int(pending[0]["times_delivered"]) if pending else 2
            log.warning("worker %s: reclaimed task entry %s of %s (delivered %d times; its worker went silent)",
                        self.name, eid, stream, deliveries)
            return bucket, eid, fields, deliveries
        return None

    def _heartbeat_loop(self) -> None:
        """One thread per worker: every heartbeat_seconds, refresh the heartbeat file and re-claim
        the task in hand (resetting its idle time), so a long task is not taken over."""
        warned: tuple[str, str] | None = None
        while not self._beat_stop.wait(self.heartbeat_s):
            self.touch()
            if self.parent_pid is not None and os.getppid() != self.parent_pid:
                log.error("worker %s: parent process is gone; exiting", self.name)
                os._exit(1)
            for held_stream, held_id in self._held:  # read or run, not handed in yet: not to be taken over
                try:
                    self.backend.run_script(HEARTBEAT, (held_stream,), (WORKER_GROUP, self.name, held_id))
                except redis.RedisError as e:
                    log.warning("worker %s: heartbeat for %s failed: %s", self.name, held_id, e)
            entry = self._entry
            if entry is None or entry == warned:
                continue
            stream, entry_id = entry
            try:
                # run_script reloads a script Redis forgot (restart, SCRIPT FLUSH) and runs it again.
                owned = self.backend.run_script(HEARTBEAT, (stream,), (WORKER_GROUP, self.name, entry_id))
                if not owned and self._entry == entry:
                    warned = entry
                    log.warning("worker %s: task entry %s was reclaimed by another worker; the pump "
                                "keeps only the first result", self.name, entry_id)
            except redis.RedisError as e:
                log.warning("worker %s: heartbeat for %s failed: %s", self.name, entry_id, e)

    def _handle(self, bucket: int, entry_id: str, fields: dict[Any, Any], deliveries: int) -> None:
        try:
            task = WorkerTask.from_fields(fields)
        except ValueError as e:
            log.error("worker %s: dropping malformed task entry %s: %s", self.name, entry_id, e)
            # Shown as text whatever it holds: an entry that is not UTF-8 must not stop the worker.
            self._dead_letter(bucket, entry_id, None, {_text(k): _text(v) for k, v in fields.items()},
                              f"malformed task: {e}")
            return
        dlq = self.streams.dlq_of(bucket)
        if not task.reply_to.startswith(self.streams.results_prefix):
            log.error("worker %s: task %s names a reply stream outside this organism (%r); dead-lettered",
                      self.name, task.task_id, task.reply_to)
            self._dead_letter(bucket, entry_id, None, task.to_fields(), "foreign reply_to")
            return
        prior = task.failures + max(0, deliveries - 1)
        if prior >= self.max_attempts:
            error = (f"task failed {prior} time(s) (its workers died or stalled); "
                     f"moved to the dead-letter stream {dlq}")
            log.error("worker %s: task %s (listener %s): %s", self.name, task.task_id, task.listener, error)
            self._dead_letter(bucket, entry_id, task, task.to_fields(), error)
            return
        expected = self._handlers.get(task.listener)
        if expected is None or expected != task.handler:
            result = WorkerResult(task.task_id, error=f"listener {task.listener!r} with handler {task.handler!r} "
                                  f"is not a cpu_bound listener of organism {self.organism.name!r} here",
                                  error_type="UnknownListener", worker=self.name)
            outcome = Outcome(result)
        else:
            known = self._listener_avg.get(task.listener)
            if (known is None or known > BATCH_SECONDS) and not self.streams.sharded:
                self._clear_the_way()
            self.current, self._entry = task.task_id, (self.streams.task_streams[bucket], entry_id)
            started = time.monotonic()
            try:
                outcome = run_task(self.backend, task, worker=self.name)
            finally:
                self.current = self._entry = None
            took = time.monotonic() - started
            self._run_avg = 0.7 * self._run_avg + 0.3 * took
            self._listener_avg[task.listener] = took if known is None else 0.7 * known + 0.3 * took
            result = outcome.result
        if result.ok:
            if self.streams.sharded:
                # The result first (the pump's stream, its own slot), then the acknowledgement in
                # the bucket: a death in between reruns the task, whose second result is dropped.
                if self._with_redis(lambda: self._write_result(task, outcome), essential=True):
                    self._with_redis(lambda: self._ack(bucket, entry_id, chain=True), essential=True)
            else:
                # Handed in with the batch's others: response, result and acknowledgement in one
                # MULTI, one round trip, all or nothing (_hand_in).
                if not self._done:
                    self._done_since = time.monotonic()
                self._done.append((entry_id, task, outcome))
            self.completed += 1
        elif result.error_type in RETRYABLE and prior + 1 < self.max_attempts:
            log.warning("worker %s: task %s failed (attempt %d of %d): %s; re-queued", self.name, task.task_id,
                        prior + 1, self.max_attempts, result.error)
            self._with_redis(lambda: self._requeue(bucket, entry_id, task, prior + 1), essential=True)
        else:
            attempts = prior + 1
            error = (f"{result.error} (failed {attempts} time(s); moved to the dead-letter stream {dlq})")
            self._dead_letter(bucket, entry_id, task, task.to_fields(), error, error_type=result.error_type)

    def _result_commands(self, task: WorkerTask, outcome: Outcome) -> list[tuple[Any, ...]]:
        """The response (SET of its temp key) and the result (XADD to the pump's stream), without
        MULTI / EXEC."""
        s = self.streams
        cmds: list[tuple[Any, ...]] = []
        if outcome.response is not None:
            key, blob = outcome.response
            cmds.append(("SET", self.backend.keys.tmp(key), blob, "EX", response_ttl(self.backend)))
        fields = outcome.result.to_fields()
        cmds.append(("XADD", task.reply_to, "MAXLEN", "~", RESULTS_MAXLEN, "*",
                      *(x for kv in fields.items() for x in kv)))
        if s.ttl:
            cmds.append(("EXPIRE", task.reply_to, s.ttl))
        return cmds

    def _transaction(self, what: str, cmds: list[tuple[Any, ...]]) -> bool:
        """MULTI `cmds` EXEC in one round trip; raise the first error. True (for _with_redis)."""
        _check_transaction(self.backend.send_commands([("MULTI",), *cmds, ("EXEC",)]), what)
        return True

    def _write_result(self, task: WorkerTask, outcome: Outcome) -> bool:
        """The response and the result, without a MULTI: the response's SET is in another slot and
        sent on its own anyway, and an XADD is atomic; the stream's TTL with it when due."""
        s = self.streams
        cmds = [c for c in self._result_commands(task, outcome) if c[0] != "EXPIRE"]
        if s.expire_due(task.reply_to):
            cmds.append(("EXPIRE", task.reply_to, s.ttl))
        # The response strictly before the result that names it (a batch of two slots would be
        # sent in either order).
        for batch in ([cmds[:1], cmds[1:]] if outcome.response is not None else [cmds]):
            for reply in self.backend.send_commands(batch):
                if isinstance(reply, Exception):
                    raise reply
        return True

    def _ack(self, bucket: int, entry_id: str, *, chain: bool = False) -> bool:
        """XACK + XDEL of a task in its bucket, in one MULTI; with `chain`, in the same round trip
        (after EXEC) a read of the bucket's next task without blocking, CHAINED_PER_BUCKET times
        in a row at most (then the loop reads the next bucket: no bucket waits behind another)."""
        stream = self.streams.task_streams[bucket]
        chain = (chain and self._chained < CHAINED_PER_BUCKET and not self._stop.is_set()
                 and time.monotonic() < self._next_claim)
        if not chain:
            self._chained = 0
            return self._transaction(f"task entry {entry_id}", [("XACK", stream, WORKER_GROUP, entry_id),
                                                                ("XDEL", stream, entry_id)])
        cmds: list[tuple[Any, ...]] = [("MULTI",), ("XACK", stream, WORKER_GROUP, entry_id), ("XDEL", stream, entry_id),
                                       ("EXEC",), ("XREADGROUP", "GROUP", WORKER_GROUP, self.name, "COUNT", 1,
                                                   "STREAMS", stream, ">")]
        # The read is best effort: once EXEC answered, the acknowledgement is done and not repeated.
        replies = self.backend.send_commands(cmds, best_effort_tail=1)
        _check_transaction(replies[:-1], f"task entry {entry_id}")
        read = replies[-1]
        got = None if isinstance(read, Exception) else self._first(bucket, read)
        if got is None:
            self._chained = 0
        else:
            self._chained += 1
            self._queue.append(got)
        return True

    def _clear_the_way(self) -> None:
        """Before a task expected to run long: hand in what is done, and give the tasks read behind
        it back to the tasks stream (copies at its end, the originals acknowledged, in one MULTI),
        where an idle worker takes them instead of their waiting for this one."""
        if self._done:
            done, self._done = self._done, []
            self._with_redis(lambda: self._finish(done, chain=False), essential=True)
        if self._queue:
            back = list(self._queue)
            self._queue.clear()
            self._with_redis(lambda: self._give_back(back), essential=True)
        self._held = ()

    def _give_back(self, entries: list[Entry]) -> bool:
        return self._put_back(self.streams.tasks, [entry_id for _, entry_id, _, _ in entries],
                              [fields for _, _, fields, _ in entries], f"{len(entries)} task(s) given back")

    def _put_back(self, stream: str, ids: list[str], copies: list[dict[Any, Any]], what: str) -> bool:
        """`copies` added at the end of `stream` (with its TTL) and the entries `ids` acknowledged
        and deleted, in one MULTI: a task given back or re-queued is never lost nor doubled."""
        s = self.streams
        cmds: list[tuple[Any, ...]] = [("XADD", stream, "*", *(x for kv in fields.items() for x in kv))
                                       for fields in copies]
        if s.ttl:
            cmds.append(("EXPIRE", stream, s.ttl))
        cmds += [("XACK", stream, WORKER_GROUP, *ids), ("XDEL", stream, *ids)]
        return self._transaction(what, cmds)

    def _finish(self, done: list[tuple[str, WorkerTask, Outcome]], *, chain: bool) -> None:
        """The responses, results, XACK and XDEL of the tasks `done`, in one MULTI; in the same round
        trip (after EXEC, outside the transaction) with `chain` the XREADGROUP for the next batch,
        unless the worker is stopping or a reclaim is due. One write, two replies read: the same
        commands as a separate read, one round trip less per batch, and without redis-py's pipeline
        machinery (its CPU cost per task is larger than the round trip's). One task bucket only (the
        tasks stream shares the results' slot)."""
        s = self.streams
        cmds: list[tuple[Any, ...]] = [("MULTI",)]
        expired: set[str] = set()
        for _, task, outcome in done:
            for c in self._result_commands(task, outcome):
                if c[0] == "EXPIRE":  # once per results stream and batch
                    if c[1] in expired:
                        continue
                    expired.add(c[1])
                cmds.append(c)
        ids = [entry_id for entry_id, _, _ in done]
        cmds.append(("XACK", s.tasks, WORKER_GROUP, *ids))
        cmds.append(("XDEL", s.tasks, *ids))
        cmds.append(("EXEC",))
        chain = chain and not self._stop.is_set() and time.monotonic() < self._next_claim
        if chain:
            cmds.append(("XREADGROUP", "GROUP", WORKER_GROUP, self.name, "COUNT", self._batch_size(), "BLOCK",
                         s.block_ms, "STREAMS", s.tasks, ">"))
        # The read's reply is best effort: if the connection fails after EXEC's reply, the results
        # are in and _finish must not be repeated (that would send them twice).
        replies = self.backend.send_commands(cmds, best_effort_tail=1 if chain else 0)
        exec_reply = replies[len(cmds) - 2] if chain else replies[-1]
        for r in replies[:len(cmds) - (1 if chain else 0)]:
            if isinstance(r, Exception):  # a refused command or EXECABORT: nothing was applied
                raise r
        if not isinstance(exec_reply, list):
            raise ResponseError(f"MULTI/EXEC for {len(done)} task(s) returned {exec_reply!r}")
        for r in exec_reply:
            if isinstance(r, Exception):
                raise r
        if chain:
            read = replies[-1]
            if isinstance(read, Exception):
                # The results are in; a failed read (NOGROUP after the stream expired, say) is left
                # to the loop's own read, which knows how to recover.
                log.debug("worker %s: chained read failed: %s", self.name, read)
                return
            first = self._batch(read)
            if first is not None:
                self._queue.appendleft(first)

    def _requeue(self, bucket: int, entry_id: str, task: WorkerTask, failures: int) -> bool:
        return self._put_back(self.streams.task_streams[bucket], [entry_id], [task.with_failures(failures).to_fields()],
                              f"task {task.task_id} re-queued")

    def _dead_letter(self, bucket: int, entry_id: str, task: WorkerTask | None, fields: dict[str, str | bytes], error: str,
                     *, error_type: str | None = None) -> None:
        """Move the task to its bucket's dead-letter stream and acknowledge it; its pump gets a
        DeadLetter result. One MULTI with one bucket; on a sharded stream the result first, then
        the rest in the bucket's slot (streams.py, "Task buckets")."""
        s = self.streams
        stream, dlq = s.task_streams[bucket], s.dlq_of(bucket)
        dead = dict(fields, error=error, error_type=error_type or DEAD_LETTER, entry_id=entry_id,
                    worker=self.name, failed_at=str(time.time()))
        res = None
        if task is not None and task.reply_to.startswith(s.results_prefix):
            res = WorkerResult(task.task_id, error=error, error_type=DEAD_LETTER, worker=self.name)

        def result(pipe: Any) -> None:
            if task is not None and res is not None:
                pipe.xadd(task.reply_to, _xfields(res.to_fields()), maxlen=RESULTS_MAXLEN, approximate=True)
                s.expire(pipe, task.reply_to)

        def bury(pipe: Any) -> None:
            pipe.xadd(dlq, _xfields(dead), maxlen=DLQ_MAXLEN, approximate=True)
            s.expire(pipe, dlq)
            pipe.xack(stream, WORKER_GROUP, entry_id)
            pipe.xdel(stream, entry_id)

        def run(*steps: Callable[[Any], None]) -> bool:
            pipe = s.client.pipeline(transaction=True)
            for step in steps:
                step(pipe)
            pipe.execute()
            return True

        if not s.sharded:
            self._with_redis(lambda: run(bury, result), essential=True)
        elif res is None or self._with_redis(lambda: run(result), essential=True):
            self._with_redis(lambda: run(bury), essential=True)

    def _leave(self) -> None:
        """Remove this consumer from the group of each bucket where it holds no pending task."""
        s = self.streams
        for stream in (*s.task_streams, *([s.wake] if s.wake else [])):
            try:
                pending = s.client.xpending_range(stream, WORKER_GROUP, min="-", max="+", count=1,
                                                  consumername=self.name)
                if not pending:
                    s.client.xgroup_delconsumer(stream, WORKER_GROUP, self.name)
            except redis.RedisError:
                pass


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def release_consumer(backend: RedisBackend, consumer: str, *, max_attempts: int, by: str = "supervisor") -> tuple[int, int]:
    """Re-queue the tasks `consumer` (a worker that died) holds and remove it from the group: the
    death counts as a failure; a task at max_attempts goes to the dead-letter stream and its pump
    gets a DeadLetter result (on a sharded tasks stream, by the worker that reads it next: streams.py,
    "Task buckets"). Returns (re-queued, dead-lettered), summed over the task buckets."""
    s = Streams(backend)
    requeued, dead = 0, 0
    for stream, dlq in zip(s.task_streams, s.dlqs):
        try:
            r, d = backend.run_script(RELEASE, (stream, dlq),
                                      (WORKER_GROUP, consumer, _NEVER if s.sharded else max_attempts, s.ttl or 0,
                                       DLQ_MAXLEN, s.results_prefix, RESULTS_MAXLEN, by))
        except ResponseError as e:
            if "NOGROUP" in str(e):  # no such bucket (expired, or Redis lost it): nothing to release
                continue
            raise
        requeued, dead = requeued + int(r), dead + int(d)
    return requeued, dead


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
