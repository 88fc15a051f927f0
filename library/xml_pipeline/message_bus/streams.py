"""Distributed mode: WorkerTasks through Redis Streams, for worker pods on any machine.

This module holds what the pump, its workers and the clients share: stream names and consumer
groups, field codecs, transaction helpers, the Lua scripts (SCRIPTS) and inspection helpers
(dead_letters, stream_info). The pump side is dispatcher.py (tasks out, results in) and
ingress.py (ingress → StreamPump → egress, `xml-pipeline send`); the worker side is worker.py;
the outage backoff is retry.py.

Streams (all under the organism's prefix, so tenants never meet):

    {prefix}tasks             WorkerTasks, each with its message sealed in it (task_seal.py);
                              consumer group "workers" (one consumer per worker process)
    {prefix}results:<pump>    WorkerResults for one pump process (it XREAD BLOCKs on it), each
                              with its response sealed in it
    {prefix}dlq               tasks that failed max_attempts times, with the last error
    {prefix}ingress           messages for the pump; consumer group "pump"
    {prefix}egress            every output of the pump (responses to external senders)
    {prefix}egress:sent:<id>  outputs of unfinished conversation <id> already on egress (a pump that
                              takes the conversation over does not write them again)

Task buckets (Redis Cluster only). On one server and on Sentinel the tasks stream is the one key
above. On a cluster it is split into contract.CLUSTER_TASKS_BUCKETS buckets, each a stream with
its own hash tag and its own dead-letter stream (`tasks:{<tag n>}`, `dlq:{<tag n>}`,
keys.ClusterKeys.task_buckets), so one organism's task traffic spreads over the masters:
- the pump puts each task in the next bucket (round robin, from a random start per pump), then
  rings the doorbell `tasks:{<prefix>}:wake` (a short stream in the organism's slot): one bell per
  bucket that got tasks in a batch, all in one round trip;
- a busy worker reads the buckets in turn, one XREADGROUP per bucket (a multi-key XREADGROUP must
  be in one slot), starting after the bucket it last took a task from, so no bucket waits behind
  another; and it reads the next task of the same bucket along with an acknowledgement, at most
  CHAINED_PER_BUCKET times in a row (worker.py);
- an idle worker (a look at every bucket found nothing) blocks in XREADGROUP on the doorbell (its
  own "workers" group, NOACK): each bell wakes one idle worker, which takes a task from the bucket
  the bell names (or, if another worker was first, waits again). Bells rung while it looked stay
  in the group for the next idle worker, so none is missed; bells nobody was idle for are trimmed
  (WAKE_MAXLEN). A task whose bell never rang (the XADD failed; a task re-queued by a worker or a
  release rings none) waits at most SHARDED_IDLE_BLOCK_MS: then the worker looks at every bucket
  again;
- every step on a task stays in its bucket's slot (acknowledge, re-queue, heartbeat, dead-letter
  with its bucket's dead-letter stream, release of a dead consumer). What crosses slots is the
  result, whose stream is the pump's (`results:{<prefix>}:<pump>`): the worker writes the result
  (one XADD, the response sealed in it; a task in the temp-key form: its response's temp key
  first), then acknowledges the task in its bucket (XACK + XDEL in one MULTI), as separate sends in
  that order. A worker that dies between
  the two leaves its task pending: it is reclaimed and run again, and the pump keeps the first
  result for the task id and drops the second. So no result is lost (the task is acknowledged only
  after its result is in) and none is delivered twice; the cost is a rerun of a task whose worker
  died in that gap, which a death mid-task costs anyway;
- a dead consumer's tasks are re-queued in their bucket with failures + 1 (release_consumer);
  one that reached max_attempts is dead-lettered by the worker that reads it next, before it runs
  (that worker writes the DeadLetter result first, then moves the task to its bucket's dead-letter
  stream and acknowledges it in one MULTI);
- heartbeat, XAUTOCLAIM of a dead worker's tasks, stream_info and dead_letters cover every bucket.

How a task stays safe:
- A worker takes a task with XREADGROUP; it stays in the group's pending list until the worker
  XACKs it (and XDELs it: the stream only holds unfinished tasks) in one MULTI with the result
  (in the task's bucket after the result, on a cluster: above). On one tasks stream a worker whose
  tasks run short reads several at once and hands their results in with one MULTI (worker.py,
  MAX_BATCH, BATCH_SECONDS); before a task of a listener known to run long it gives the tasks read
  behind it back (copies at the stream's end, the originals acknowledged, in one MULTI).
- While a task runs, a heartbeat thread re-claims it for its own consumer every heartbeat_seconds
  (XCLAIM ... JUSTID, only while it still owns it: a Lua script checks first), which resets its idle
  time; so are the tasks the worker read with it and has not handed in yet. A worker that dies stops heartbeating; after claim_idle_seconds another worker's XAUTOCLAIM
  takes the task over. Long tasks of live workers are never stolen (heartbeat < claim idle).
- Failures: a handler error re-queues the task with failures+1; a death is counted by Redis
  (delivery count). When failures + deaths reach max_attempts the task goes to the dead-letter
  stream and the pump gets an error result — the caller still gets exactly one response.
- Exactly one response: a task may run twice (a stalled worker comes back after its task was
  reclaimed). The pump keeps a future per task id and takes the first result; a later duplicate
  is dropped (and its response key deleted, for a task in the temp-key form).
- A pump that dies mid-conversation leaves its ingress entry pending; every live pump sweeps the
  ingress stream with XAUTOCLAIM every claim_idle_seconds / 2 (not only at start), takes it over,
  runs the conversation again and writes only the outputs egress has not seen yet.
- Across a failover to a replica (Sentinel, Cluster), an output the dead master wrote but had not
  yet replicated is gone with the conversation's ack; a reader of egress may already have seen it
  on the old master. The re-run writes it again with the same message id: one answer or error per
  conversation, possibly on egress twice under one id (readers that must see it once skip a
  message id they already took; docs/storage.md, "Egress across a failover").
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

import functools
import json
import os
import socket
import time
import uuid
from typing import TYPE_CHECKING, Any, cast

import redis
from redis.exceptions import ResponseError
from redis.typing import EncodableT, FieldT

from ..contract import CLUSTER_TASKS_BUCKETS
from ..memory.keys import ClusterKeys
from ..memory.redis_scripts import LuaScript

if TYPE_CHECKING:
    from ..memory.redis_backend import RedisBackend

WORKER_GROUP = "workers"
PUMP_GROUP = "pump"
#: Outputs kept in the egress stream (approximate MAXLEN), dead letters kept in the dlq.
EGRESS_MAXLEN = 10_000
DLQ_MAXLEN = 10_000
RESULTS_MAXLEN = 100_000

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

# KEYS: egress stream, the conversation's sent-record (a HASH: output message id -> 1)
# ARGV: message id, ttl (0 = none), maxlen, then the entry's field/value pairs.
# Writes an output of a conversation once: a pump that takes over an unfinished conversation from a
# dead one re-runs it, and the outputs the dead pump got to are already on egress. Output ids are
# derived from the conversation's message id (message.derived_id), so a re-run repeats them.
_EGRESS_ONCE_LUA = """
if redis.call('HSETNX', KEYS[2], ARGV[1], 1) == 0 then return 0 end
local ttl = tonumber(ARGV[2])
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', unpack(ARGV, 4))
if ttl > 0 then
  redis.call('EXPIRE', KEYS[1], ttl)
  redis.call('EXPIRE', KEYS[2], ttl)
end
return 1
"""
EGRESS_ONCE = LuaScript("egress_once", 2, -1, _EGRESS_ONCE_LUA)


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _xfields(fields: dict[str, str] | dict[str, str | bytes]) -> dict[FieldT, EncodableT]:
    """`fields` typed as xadd wants it. redis-py asks for a dict of its wide key/value unions and a
    dict is invariant, so a dict of str (a valid value) needs this cast; no copy is made."""
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



def consumer_name(role: str) -> str:
    """Unique per process and readable: <role>-<host>-<pid>-<random>."""
    return f"{role}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def as_redis(backend: object) -> RedisBackend:
    """`backend` (a SharedBackend from create_backend) as the RedisBackend distributed mode runs on;
    ValueError if it is another type."""
    from ..memory.redis_backend import RedisBackend  # late: memory/manager users never load redis-py

    if not isinstance(backend, RedisBackend):
        raise ValueError(f"distributed mode needs the redis backend (backend.type: redis), "
                         f"not {type(backend).__name__}")
    return backend


#: How long an idle worker blocks on the doorbell before it looks at every task bucket again (the
#: longest a task whose bell did not ring waits; module docstring).
SHARDED_IDLE_BLOCK_MS = 100
#: Bells kept in the doorbell stream (approximate MAXLEN): bells nobody was idle for are dropped.
WAKE_MAXLEN = 64


def task_bucket_count(backend: RedisBackend) -> int:
    """How many task buckets the organism on `backend` has: CLUSTER_TASKS_BUCKETS on a Redis
    Cluster, 1 (the plain tasks stream) on one server or Sentinel."""
    return CLUSTER_TASKS_BUCKETS if backend.config.redis_mode == "cluster" else 1


class Streams:
    """Key names of one organism's streams and the small Redis steps shared by pump and workers.

    `buckets`: the number of task buckets (task_bucket_count by default; 1 on a cluster puts every
    task in the organism's slot, as a baseline for bench/cluster_tasks.py)."""

    def __init__(self, backend: RedisBackend, *, buckets: int | None = None) -> None:
        as_redis(backend)  # a caller outside mypy's view may hand in another backend
        self.backend = backend
        self.client: redis.Redis = backend.client
        self.ttl: int | None = backend.config.ttl
        count = task_bucket_count(backend) if buckets is None else buckets
        if count == 1:
            pairs: tuple[tuple[str, str], ...] = ((backend.key("tasks"), backend.key("dlq")),)
        else:
            if not isinstance(backend.keys, ClusterKeys):
                raise ValueError(f"{count} task buckets need a Redis Cluster backend, not {type(backend).__name__}")
            pairs = _bucket_keys(backend.keys.prefix, count)
        #: The task buckets (tasks stream, its dead-letter stream), in bucket order; one off a cluster.
        self.task_streams: tuple[str, ...] = tuple(t for t, _ in pairs)
        self.dlqs: tuple[str, ...] = tuple(d for _, d in pairs)
        #: The first bucket: the tasks stream itself where there is one bucket.
        self.tasks = self.task_streams[0]
        self.dlq = self.dlqs[0]
        self.sharded = len(pairs) > 1
        #: The doorbell of a sharded tasks stream (module docstring); None with one bucket.
        self.wake: str | None = backend.key("tasks", "wake") if self.sharded else None
        self.ingress = backend.key("ingress")
        self.egress = backend.key("egress")
        self.results_prefix = backend.key("results") + ":"
        # Blocking reads must return before the socket timeout fires.
        self.block_ms = max(50, min(1000, int(backend.config.socket_timeout * 500)))

    def expire_due(self, key: str) -> bool:
        """True when `key` needs its TTL set by this writer: always with one bucket (every write
        carries it, in its MULTI); on a sharded tasks stream at most every ttl/8 per key and process,
        for the single-command writes to the organism's slot (a result, a bell), whose streams then
        live at least 7/8 of the TTL after a write."""
        if not self.ttl:
            return False
        if not self.sharded:
            return True
        now = time.monotonic()
        last = _EXPIRED.get(key)
        if last is not None and now - last < self.ttl / 8:
            return False
        if len(_EXPIRED) > 4096:
            _EXPIRED.clear()
        _EXPIRED[key] = now
        return True

    def results(self, pump_id: str) -> str:
        return self.backend.key("results", pump_id)

    def dlq_of(self, bucket: int) -> str:
        return self.dlqs[bucket]

    def describe_tasks(self) -> str:
        if not self.sharded:
            return f"Redis stream {self.tasks}"
        return f"{len(self.task_streams)} Redis streams {self.task_streams[0]} .. {self.task_streams[-1]}"

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

    def ensure_task_groups(self) -> None:
        """The workers' group on every task bucket (and on the doorbell)."""
        for stream in self.task_streams:
            self.ensure_group(stream, WORKER_GROUP)
        if self.wake is not None:
            self.ensure_group(self.wake, WORKER_GROUP)


#: When this process last set the TTL of a key it writes with single commands (Streams.expire_due).
_EXPIRED: dict[str, float] = {}


@functools.lru_cache(maxsize=64)
def _bucket_keys(prefix: str, count: int) -> tuple[tuple[str, str], ...]:
    # A few thousand CRC16s: computed once per prefix and process.
    return ClusterKeys(prefix).task_buckets(count)


def _transaction(backend: RedisBackend, cmds: list[tuple[Any, ...]]) -> list[Any]:
    """Run MULTI ... EXEC `cmds` in one round trip (backend.send_commands); raise the first error
    (a refused command aborts the whole transaction, EXECABORT)."""
    return _check_transaction(backend.send_commands(cmds))


def _check_transaction(replies: list[Any], what: str = "") -> list[Any]:
    """EXEC's reply of a MULTI ... EXEC's replies; raise the first error (a refused command or
    EXECABORT: nothing was applied)."""
    for r in replies:
        if isinstance(r, Exception):
            raise r
    exec_reply = replies[-1]
    if not isinstance(exec_reply, list):
        raise ResponseError(f"MULTI/EXEC{' for ' + what if what else ''} returned {exec_reply!r}")
    for r in exec_reply:
        if isinstance(r, Exception):
            raise r
    return exec_reply


def _shown(field: str, value: Any) -> str:
    """A dead letter's field as text: a task's sealed input is binary (task_seal.py), shown by size."""
    if field == "input" and isinstance(value, bytes):
        return f"<signed input, {len(value)} bytes>"
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def dead_letters(backend: RedisBackend, count: int = 100) -> list[dict[str, str]]:
    """The newest entries of the dead-letter stream(s) (for inspection and tests), newest first."""
    s = Streams(backend)
    out: list[tuple[tuple[int, int], dict[str, str]]] = []
    for dlq in s.dlqs:
        # redis-py's stub allows a nil reply and nil fields; XREVRANGE sends an array (empty for a
        # missing stream) of entries that all have fields, so `or` only narrows the type.
        for i, f in s.client.xrevrange(dlq, count=count) or []:
            entry = {**{_s(k): _shown(_s(k), v) for k, v in (f or {}).items()}, "_id": _s(i)}
            if s.sharded:
                entry["_stream"] = dlq
            ms, _, seq = entry["_id"].partition("-")
            out.append(((int(ms), int(seq or 0)), entry))
    out.sort(key=lambda pair: pair[0], reverse=True)
    return [entry for _, entry in out[:count]]


def _stream_figures(s: Streams, keys: tuple[str, ...], group: str | None) -> dict[str, Any]:
    length, pending = 0, None
    for key in keys:
        length += int(s.client.xlen(key) or 0)
        if group is not None:
            try:
                pending = (pending or 0) + int(s.client.xpending(key, group).get("pending") or 0)
            except ResponseError:  # no group on this stream (yet)
                pass
    out: dict[str, Any] = {"length": length}
    if group:
        out["pending"] = pending
    if len(keys) > 1:
        out["buckets"] = len(keys)
    return out


def stream_info(backend: RedisBackend) -> dict[str, Any]:
    """Lengths and pending counts of the organism's streams (the task buckets summed up)."""
    s = Streams(backend)
    out: dict[str, Any] = {}
    for name, keys, group in (("tasks", s.task_streams, WORKER_GROUP), ("ingress", (s.ingress,), PUMP_GROUP),
                              ("egress", (s.egress,), None), ("dlq", s.dlqs, None)):
        try:
            out[name] = _stream_figures(s, keys, group)
        except redis.RedisError as e:
            out[name] = {"error": str(e)}
    return json.loads(json.dumps(out))


#: The Lua scripts of the pump and the workers (memory.redis_functions puts them into the Redis
#: Functions library beside the backend's, so a tenant on a shared Redis can FCALL them).
HEARTBEAT = LuaScript("heartbeat", 1, 3, _HEARTBEAT_LUA)
RELEASE = LuaScript("release", 2, 8, _RELEASE_LUA)
SCRIPTS: tuple[LuaScript, ...] = (EGRESS_ONCE, HEARTBEAT, RELEASE)
