"""Distributed mode: WorkerTasks through Redis Streams, for worker pods on any machine.

This module holds what the pump, its workers and the clients share: stream names and consumer
groups, field codecs, transaction helpers, the Lua scripts (SCRIPTS) and inspection helpers
(dead_letters, stream_info). The pump side is dispatcher.py (tasks out, results in) and
ingress.py (ingress → StreamPump → egress, `xml-pipeline send`); the worker side is worker.py;
the outage backoff is retry.py.

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

import json
import os
import socket
import uuid
from typing import TYPE_CHECKING, Any, cast

import redis
from redis.exceptions import ResponseError
from redis.typing import EncodableT, FieldT

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


class Streams:
    """Key names of one organism's streams and the small Redis steps shared by pump and workers."""

    def __init__(self, backend: RedisBackend) -> None:
        as_redis(backend)  # a caller outside mypy's view may hand in another backend
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


def _transaction(backend: RedisBackend, cmds: list[tuple[Any, ...]]) -> list[Any]:
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


def dead_letters(backend: RedisBackend, count: int = 100) -> list[dict[str, str]]:
    """The newest entries of the dead-letter stream (for inspection and tests)."""
    s = Streams(backend)
    # redis-py's stub allows a nil reply and nil fields; XREVRANGE sends an array (empty for a missing
    # stream) of entries that all have fields, so `or` only narrows the type.
    rows = s.client.xrevrange(s.dlq, count=count) or []
    return [{**{_s(k): _s(v) for k, v in (f or {}).items()}, "_id": _s(i)} for i, f in rows]


def stream_info(backend: RedisBackend) -> dict[str, Any]:
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


#: The Lua scripts of the pump and the workers (memory.redis_functions puts them into the Redis
#: Functions library beside the backend's, so a tenant on a shared Redis can FCALL them).
HEARTBEAT = LuaScript("heartbeat", 1, 3, _HEARTBEAT_LUA)
RELEASE = LuaScript("release", 2, 8, _RELEASE_LUA)
SCRIPTS: tuple[LuaScript, ...] = (EGRESS_ONCE, HEARTBEAT, RELEASE)
