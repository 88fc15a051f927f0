"""RedisClusterBackend: the SharedBackend on a Redis Cluster (`redis+cluster://` URLs).

The same guarantees as RedisBackend for a thread (docs/storage.md, "Redis Cluster"): the
compare-and-append, the append-id record, max_slots and the thread's TTL are one script on the
thread's slot (redis_cluster_scripts.C_APPEND). What spans slots is done in an order that keeps
the library's answers right when a step fails half way:

- registry: the chain key `chain:{C}` is the authority, written first (SET, or SET NX for
  get_or_create, which makes that race-free: the first writer wins and every caller gets its
  uuid); the reverse entry `uuid:{U}` is written after, and `registry_get_chain` trusts it only if
  the chain key agrees (read repair);
- index: N bucket SETs (contract.CLUSTER_INDEX_BUCKETS). A chain's entry is added before its
  key, a thread's right after the append that created it (and again on any repeat of that append);
  listing checks every entry against its key and drops the dead ones;
- TTL: the chain key and the index buckets live in other slots than their thread, so the append
  refreshes them from the client, at most every ttl/8 per key and process; to make up for that
  lag they are given ttl + ttl/8.

redis-py's RedisCluster follows MOVED and ASK, and retries TRYAGAIN (a multi-key script on a slot
being migrated), CLUSTERDOWN and connection errors; on top of that every idempotent operation is
retried with backoff for about as long as a failover takes (redis_topology.CLUSTER_RETRIES), so a
resharding or a promoted replica is not seen by the caller.

The pump's fast path runs one RedisPipe per master (redis_cluster_pipe.ClusterPipe, offered where
`node_pipes_capable()`), with the commands this module packs (`append_command`,
`append_follow_ups`, `append_outcome`: the same as the blocking path's) and the client's slot map;
a worker's task loop gets one DirectConnection per master (`use_direct_connection`).
`pipe_capable()` stays False: a single RedisPipe or DirectConnection talks to one server. The
distributed worker mode works: its streams share one hash tag per organism (keys.ClusterKeys.key)
and `send_commands` routes a batch to the node of its slot.
"""
from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar, cast

from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.exceptions import (AskError, ClusterDownError, ClusterError, MasterDownError, MovedError, NoPermissionError,
                              NoScriptError, RedisClusterException, ResponseError, SlotNotCoveredError, TryAgainError)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from ..errors import AppendIdConflict, BackendError, BackendUnavailable, ThreadFullError
from . import redis_cluster_scripts as cs
from .redis_cluster_index import ClusterIndex
from .redis_cluster_route import NodeConnections, refresh, send_routed
from . import redis_functions
from . import redis_topology
from .config import BackendConfig, compat_config, redact_url
from .keys import ClusterKeys, check_tagged_id
from .protocol import Appended
from .redis_backend import RedisBackend, _signer_for, check_append_args
from .redis_scripts import LuaScript
from .signing import Signer
from .redis_wire import Packed, tls_supported

__all__ = ["RedisClusterBackend"]

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Errors after which an idempotent operation is tried again (the slot map is refreshed by then).
RETRYABLE = (RedisConnectionError, RedisTimeoutError, ClusterDownError, SlotNotCoveredError, TryAgainError,
             MasterDownError, MovedError, AskError)


class RedisClusterBackend(RedisBackend):
    """SharedBackend on a Redis Cluster. Thread-safe; one RedisCluster client per instance.

    (Over 500 lines: the contract's operations on a cluster and the commands the pump's per-node
    pipes send for them share their checks and parsing, so they stay in one class.)"""

    def __init__(self, config: BackendConfig | str | None = None, *, url: str | None = None,
                 prefix: str | None = None, ttl: int | None = None, signer: Signer | None = None) -> None:
        config = compat_config(config, "redis", redis_url=url, redis_prefix=prefix, redis_ttl=ttl)
        if config.redis_mode != "cluster":
            raise ValueError(f"{config.redacted_url} is not a redis+cluster:// URL")
        self.config = config
        self.keys: ClusterKeys = ClusterKeys(config.redis_prefix)
        self._prefix = config.redis_prefix
        self._ttl = config.ttl or 0
        self._url = redact_url(config.redis_url)
        self._username = config.redis_username
        self._password = config.redis_password
        self._signer = signer if signer is not None else _signer_for(config)
        # Connected on first use, like a pool: a cluster that is down while a pod starts is an
        # operation's BackendUnavailable (after the retries), not a constructor's crash.
        self._client: Any = None
        self._client_lock = threading.Lock()
        self._retry = Retry(ExponentialWithJitterBackoff(cap=0.5, base=0.02), redis_topology.failover_retries(config),
                            supported_errors=RETRYABLE)
        self._ping_retry = Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError, RedisTimeoutError))
        self._wait = config.redis_wait_replicas
        # Chain keys and index buckets get ttl + ttl/8 and are refreshed at most every ttl/8.
        self._slack_ms = self._ttl * 1000 + self._ttl * 125
        self.index = ClusterIndex(self)
        self._mechanism: redis_functions.Mechanism | None = None
        self._closed = False
        log.debug("redis cluster backend on %s, prefix %r, ttl %s", self._url, self._prefix, self._ttl or "none")

    @property
    def client(self) -> Any:  # type: ignore[override]
        """The redis-py RedisCluster client (it keeps the slot map and follows redirections)."""
        client = self._client
        if client is None:
            with self._client_lock:
                if self._client is None:
                    try:
                        self._client = redis_topology.cluster_client(self.config, self._username, self._password)
                    except RedisClusterException as e:  # no seed node answered: retried like a refused connection
                        raise RedisConnectionError(self._scrub(e)) from None
                client = self._client
        return client

    def __repr__(self) -> str:
        return f"RedisClusterBackend(url={self._url!r}, prefix={self._prefix!r}, ttl={self._ttl or None})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (self.config, self._signer.keys if self._signer.local else None))

    # -- running commands -------------------------------------------------------------------------
    @property
    def script_mechanism(self) -> redis_functions.Mechanism | None:
        return self._mechanism

    def _do(self, what: str, fn: Callable[[], T], retry: bool = True) -> T:
        try:
            return super()._do(what, fn, retry)
        except RedisClusterException as e:  # no node reachable at all, or a cross-slot mistake
            raise BackendUnavailable(f"Redis Cluster at {self._url}: {what} failed: {self._scrub(e)}") from None

    def _mechanism_now(self) -> redis_functions.Mechanism:
        """FCALL when the library's function library (with the cluster scripts) is loaded, as the
        operator does on every master of a shared cluster; EVALSHA/EVAL otherwise. Probed once."""
        if self._mechanism is None:
            lib = redis_functions.library()
            try:
                reply = self.client.execute_command("FCALL_RO", lib.version_function, 0)
                self._mechanism = "fcall" if redis_functions.probe_reply_ok(reply, lib) else "eval"
            except ResponseError:
                self._mechanism = "eval"
        return self._mechanism

    def _commands(self, script: LuaScript, keys: tuple[str, ...], args: tuple[Any, ...]) -> tuple[tuple[Any, ...], ...]:
        """The command that runs `script`, then the one to send if the first is unavailable there."""
        tail = (len(keys), *keys, *args)
        evalsha, eval_ = ("EVALSHA", script.sha, *tail), ("EVAL", script.source, *tail)
        if self._mechanism_now() == "fcall":
            return ("FCALL", redis_functions.library().function(script), *tail), evalsha, eval_
        return evalsha, eval_

    def _eval(self, script: LuaScript, keys: tuple[str, ...], args: tuple[Any, ...]) -> Any:
        """The script on the node of the keys' slot: FCALL, or EVALSHA (EVAL when that node does not
        know the script yet, which also caches it there). redis-py routes by the first key and
        follows redirections."""
        try:
            return self._first_available(self._commands(script, keys, args), self.client.execute_command)
        except ClusterError as e:
            # redis-py gives up after 16 redirections and TRYAGAINs (well under a second): a slot
            # whose migration is still under way. Retried like TRYAGAIN, with backoff.
            if "TTL exhausted" in str(e):
                raise TryAgainError(str(e)) from None
            raise

    def _first_available(self, commands: tuple[tuple[Any, ...], ...], send: Callable[..., Any]) -> Any:
        for i, command in enumerate(commands):
            try:
                return send(*command)
            except ResponseError as e:
                unavailable = isinstance(e, NoScriptError) or redis_functions.mechanism_error(e)
                if i == len(commands) - 1 or not unavailable:
                    raise
                if command[0] == "FCALL":
                    self._mechanism = None  # probe again next time (the library may be reloaded)
        raise AssertionError("unreachable")

    def _eval_waited(self, script: LuaScript, keys: tuple[str, ...], args: tuple[Any, ...]) -> Any:
        """The script, then WAIT on the same connection (WAIT covers the writes of its own
        connection only): redis_wait_replicas replicas must acknowledge it within socket_timeout,
        else BackendUnavailable (the write is on the master; a retry repeats it harmlessly)."""
        client = self.client
        node = client.get_node_from_key(keys[0])
        pool = client.get_redis_connection(node).connection_pool
        conn = pool.get_connection()
        def send(*command: Any) -> Any:
            conn.send_command(*command)
            return conn.read_response()

        try:
            reply = self._first_available(self._commands(script, keys, args), send)
            conn.send_command("WAIT", self._wait, redis_topology.wait_timeout_ms(self.config))
            acked = conn.read_response()
        except (MovedError, AskError):
            client.nodes_manager.initialize()  # the slot moved: the next attempt asks its new owner
            raise
        except BaseException:
            conn.disconnect()
            raise
        finally:
            pool.release(conn)
        self._check_wait(acked)
        return reply

    def _write(self, script: LuaScript, keys: tuple[str, ...], args: tuple[Any, ...]) -> Any:
        return self._eval_waited(script, keys, args) if self._wait else self._eval(script, keys, args)

    def _follow_up(self, commands: list[tuple[Any, ...]]) -> None:
        """Single-key commands on other slots (index entries, expiry refreshes), one pipeline that
        redis-py splits by node."""
        if not commands:
            return
        pipe = self.client.pipeline()
        for c in commands:
            pipe.execute_command(*c)
        for r in pipe.execute(raise_on_error=False):
            if isinstance(r, Exception):
                raise r

    def _due(self, key: str) -> bool:
        return self.index.due(key)

    def _index_add(self, entry: str, out: list[tuple[Any, ...]]) -> None:
        self.index.add(entry, out)

    def _touch_bucket(self, entry: str, out: list[tuple[Any, ...]]) -> None:
        self.index.touch(entry, out)

    # -- Context Buffer -------------------------------------------------------------------------
    def buffer_append(self, thread_id: str, slot_data: bytes, *, max_slots: int | None = None,
                      append_id: str | None = None) -> int:
        outcome = self._append(thread_id, slot_data, max_slots, append_id, -1)
        if outcome.status == "repeat" and outcome.stored != bytes(slot_data):
            raise AppendIdConflict(thread_id, append_id or "", outcome.position)
        return outcome.position

    def buffer_append_at(self, thread_id: str, slot: bytes, index: int, *, max_slots: int | None = None,
                         append_id: str | None = None, items: Sequence[tuple[str, bytes]] = ()) -> Appended:
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise ValueError(f"index must be an integer >= 0, got {index!r}")
        if items:
            self.temp_put_many(list(items))
        try:
            return self._append(thread_id, slot, max_slots, append_id, index)
        except ThreadFullError:
            if items:
                self.temp_delete(*(k for k, _ in items))
            raise

    def _append_call(self, thread_id: str, slot: bytes, max_slots: int | None, append_id: str | None,
                     expected: int) -> tuple[tuple[str, ...], tuple[Any, ...]]:
        """The KEYS and ARGV of C_APPEND for these arguments (checked here)."""
        check_append_args(thread_id, slot, max_slots, append_id)
        aid = append_id if append_id is not None else _random_id()
        keys = (self.keys.buffer(thread_id), self.keys.op(thread_id), self.keys.uuid(thread_id))
        return keys, (bytes(slot), aid, self._ttl, max_slots or 0, expected)

    def _append(self, thread_id: str, slot: bytes, max_slots: int | None, append_id: str | None,
                expected: int) -> Appended:
        keys, args = self._append_call(thread_id, slot, max_slots, append_id, expected)

        def run() -> Any:
            reply = self._write(cs.C_APPEND, keys, args)
            self._follow_up(self.append_follow_ups(thread_id, reply))
            return reply

        outcome = self.append_outcome(self._do("buffer_append", run))
        if outcome is None:
            raise ThreadFullError(thread_id, max_slots or 0)
        return outcome

    def append_follow_ups(self, thread_id: str, reply: Any) -> list[tuple[Any, ...]]:
        """The commands on other slots that C_APPEND's `reply` calls for: the thread's index entry
        (a new thread, or a repeat whose first attempt may have stopped before adding it), the
        expiry refreshes of its bucket and chain key when due. The pump's cluster pipe sends the
        same ones (redis_cluster_pipe.py)."""
        follow: list[tuple[Any, ...]] = []
        if not (isinstance(reply, list) and reply):
            return follow
        status = reply[0]
        if status in (cs.STORED, cs.REPEAT) and (status == cs.REPEAT or reply[2] == 1):
            self._index_add(f"t:{thread_id}", follow)
        elif status == cs.STORED:
            self._touch_bucket(f"t:{thread_id}", follow)
        if status == cs.STORED and self._ttl and reply[3]:
            chain_key = self.keys.chain(reply[3].decode())
            if self._due(chain_key):
                follow.append(("PEXPIRE", chain_key, self._slack_ms))
                self._touch_bucket(f"c:{reply[3].decode()}", follow)
        return follow

    @staticmethod
    def append_outcome(reply: Any) -> Appended | None:
        """C_APPEND's reply as an Appended (None: the thread is full)."""
        status = reply[0] if isinstance(reply, list) and len(reply) >= 2 else None
        if status == cs.STORED:
            return Appended("stored", int(reply[1]))
        if status == cs.MOVED:
            return Appended("moved", int(reply[1]))
        if status == cs.REPEAT and len(reply) == 3:
            return Appended("repeat", int(reply[1]), reply[2])
        if status == cs.FULL:
            return None
        raise BackendError(f"unexpected reply {reply!r:.80} from the append script")

    def append_command(self, thread_id: str, slot: bytes, index: int, *, max_slots: int | None,
                       append_id: str, load: bool = False) -> tuple[str, tuple[Any, ...]]:
        """buffer_append_at's compare-and-append as one command (FCALL, or EVALSHA: the mechanism
        this backend uses now, probed on first use; EVAL with `load`, which caches the script on
        that node) and the key it is routed by; the pump's cluster pipe sends it and reads the
        reply with append_outcome / append_follow_ups."""
        keys, args = self._append_call(thread_id, slot, max_slots, append_id, index)
        commands = self._commands(cs.C_APPEND, keys, args)
        return keys[0], commands[-1 if load else 0]

    def buffer_delete_thread(self, thread_id: str) -> bool:
        check_tagged_id(thread_id, "thread_id")
        buffer, op, entry = self.keys.buffer(thread_id), self.keys.op(thread_id), f"t:{thread_id}"

        def run() -> bool:
            existed = int(self.client.delete(buffer, op)) > 0
            self.client.srem(self.keys.bucket(entry), entry)
            if self.client.exists(buffer):  # an append created it again meanwhile: keep it listed
                self.client.sadd(self.keys.bucket(entry), entry)
            return existed

        return self._do("buffer_delete_thread", run)

    # -- Thread Registry ------------------------------------------------------------------------
    def registry_set(self, chain: str, uuid: str) -> None:
        self._check_chain(chain)
        check_tagged_id(uuid, "uuid")

        def run() -> None:
            follow: list[tuple[Any, ...]] = []
            self._index_add(f"c:{chain}", follow)
            self._touch_bucket(f"t:{uuid}", follow)  # the write refreshes the thread's expiry too
            self._follow_up(follow)  # listed before it exists: listing drops entries without a key
            _, previous = self._write(cs.C_CHAIN_SET, (self.keys.chain(chain),), (uuid, self._slack_ms, 0))
            self._link(chain, uuid, previous.decode() if previous else "", only_if_missing=False)

        self._do("registry_set", run)

    def registry_get_or_create(self, chain: str, uuid: str) -> str:
        self._check_chain(chain)
        check_tagged_id(uuid, "uuid")

        def run() -> str:
            follow: list[tuple[Any, ...]] = []
            self._index_add(f"c:{chain}", follow)
            self._touch_bucket(f"t:{uuid}", follow)
            self._follow_up(follow)
            wrote, current = self._write(cs.C_CHAIN_SET, (self.keys.chain(chain),), (uuid, self._slack_ms, 1))
            winner = current.decode() if wrote == 0 else uuid
            # The winner's reverse entry: written by the creator; refreshed (or repaired, if its
            # creator stopped before writing it) by everybody else.
            self._link(chain, winner, "", only_if_missing=wrote == 0)
            return winner

        return self._do("registry_get_or_create", run)

    def _link(self, chain: str, uuid: str, previous_uuid: str, *, only_if_missing: bool) -> None:
        """Write uuid:{U} -> chain after the chain key, then remove the stale sides: the reverse
        entry of the chain's previous uuid, and the chain key the uuid pointed to before."""
        old_chain = self._write(cs.C_UUID_SET, (self.keys.uuid(uuid), self.keys.buffer(uuid), self.keys.op(uuid)),
                                (chain, self._ttl, 1 if only_if_missing else 0))
        old_chain = old_chain.decode() if old_chain else ""
        if previous_uuid and previous_uuid != uuid:
            self._eval(cs.C_DEL_IF, (self.keys.uuid(previous_uuid),), (chain,))
        if old_chain and old_chain != chain and not only_if_missing:
            if self._eval(cs.C_DEL_IF, (self.keys.chain(old_chain),), (uuid,)):
                entry = f"c:{old_chain}"
                self.client.srem(self.keys.bucket(entry), entry)

    def registry_get_chain(self, uuid: str) -> str | None:
        key = self.keys.uuid(check_tagged_id(uuid, "uuid"))

        def run() -> str | None:
            value = self.client.get(key)
            if value is None:
                return None
            chain = value.decode()
            # Read repair: the chain key is the authority; a reverse entry it does not confirm is
            # the leftover of a re-mapping that stopped half way.
            if self.client.get(self.keys.chain(chain)) != uuid.encode():
                try:
                    self._eval(cs.C_DEL_IF, (key,), (chain,))
                except NoPermissionError:
                    pass  # a read-only client user (client_acl) answers right; a writer repairs it
                return None
            return chain

        return self._do("registry_get_chain", run)

    def registry_delete(self, uuid: str) -> bool:
        check_tagged_id(uuid, "uuid")

        def run() -> bool:
            chain = self._write(cs.C_UUID_TAKE, (self.keys.uuid(uuid),), ())
            if not chain:
                return False
            chain = chain.decode()
            if self._eval(cs.C_DEL_IF, (self.keys.chain(chain),), (uuid,)):
                entry = f"c:{chain}"
                self.client.srem(self.keys.bucket(entry), entry)
            return True

        return self._do("registry_delete", run)

    # -- Temporary data (single keys; batches are split by node) --------------------------------
    def temp_put_many(self, items: list[tuple[str, bytes]]) -> None:
        if not items:
            return
        ttl = self._ttl or 86400
        names = [self.keys.tmp(check_tagged_id(k, "temp key")) for k, _ in items]
        for _, v in items:
            if not isinstance(v, (bytes, bytearray, memoryview)):
                raise TypeError(f"data must be bytes, got {type(v).__name__}")
        self._do("temp_put", lambda: self._follow_up([("SET", n, v, "EX", ttl) for n, (_, v) in zip(names, items)]))

    def temp_get_many(self, keys: list[str]) -> list[bytes | None]:
        if not keys:
            return []
        names = [self.keys.tmp(check_tagged_id(k, "temp key")) for k in keys]
        return self._do("temp_get", lambda: list(self.client.mget_nonatomic(names)))

    def temp_take(self, key: str, *also_delete: str) -> bytes | None:
        names = [self.keys.tmp(check_tagged_id(k, "temp key")) for k in (key, *also_delete)]

        # Two steps, each retried on its own: a GET is a read, and a DEL repeated after a lost
        # reply deletes nothing more (on one server the pair is one pipeline, not retried).
        got = self._do("temp_get+delete", lambda: cast("bytes | None", self.client.get(names[0])))
        self._do("temp_get+delete", lambda: self.client.delete(*names))
        return got

    def _pipeline(self, packed: Packed, count: int, *, best_effort_tail: int = 0) -> list[Any]:
        raise BackendError(f"Redis Cluster at {self._url}: packed commands cannot be routed to a node "
                           "(send_commands routes commands by their keys)")

    def send_commands(self, commands: list[tuple[Any, ...]], *, best_effort_tail: int = 0) -> list[Any]:
        """RedisCore.send_commands, routed to the node of the commands' slot
        (redis_cluster_route.send_routed); on the calling thread's own connections after
        use_direct_connection."""
        return send_routed(self.client, commands, best_effort_tail, self.pack_commands, self._own_connections())

    # -- A worker's own connections: one DirectConnection per master -------------------------------
    _nodes: NodeConnections | None = None

    def use_direct_connection(self) -> None:
        """The calling thread's send_commands and buffer_get_slot (a worker's task loop: its reads,
        its result transactions, large slots) go through connections of its own, one per master;
        other threads keep the pools. Not with redis_wait_replicas (WAIT rides on the pooled path)."""
        if self.node_pipes_capable():
            cfg = self.config
            self._nodes = NodeConnections(self.connection_kwargs(), socket_timeout=cfg.socket_timeout,
                                          connect_timeout=cfg.connect_timeout)

    def _own_connections(self) -> NodeConnections | None:
        nodes = self._nodes
        return nodes if nodes is not None and nodes.owner == threading.get_ident() else None

    def buffer_get_slot(self, thread_id: str, index: int) -> bytes | None:
        if self._own_connections() is None:
            return super().buffer_get_slot(thread_id, index)
        key = self.keys.buffer(check_tagged_id(thread_id, "thread_id"))
        if isinstance(index, bool) or not isinstance(index, int):
            raise TypeError(f"index must be an int, got {type(index).__name__}")

        def run() -> bytes | None:
            # A large slot is read into the connection's reusable buffer (redis_direct.py).
            (reply,) = self.send_commands([("LINDEX", key, index)])
            if isinstance(reply, Exception):
                raise reply
            return cast("bytes | None", reply)

        return self._do("buffer_get_slot", run)

    # -- Index (N buckets: redis_cluster_index.py) --------------------------------------------------
    def _live(self, kind: bytes, limit: int | None = None) -> Iterator[tuple[str, bytes]]:
        return self.index.live(kind, limit)

    def _clear_index(self, kind: bytes) -> int:
        return self.index.clear(kind)

    def reindex(self) -> dict[str, int]:
        """Add every thread and chain of this prefix to the index buckets, from a SCAN of every master."""
        return self._do("reindex", self.index.reindex)

    # -- Lifecycle and monitoring -----------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        out = super().info()
        out["mode"] = "cluster"
        out["masters"] = len(self.client.get_primaries())
        return out

    def ping(self) -> bool:
        if self._closed:
            return False
        try:
            return bool(self._ping_retry.call_with_retry(lambda: self.client.ping(target_nodes="primaries"),
                                                         lambda _e: None))
        except Exception:  # noqa: BLE001 - ping reports health, it must not raise
            return False

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._client is not None:
                self._client.close()
            if self._nodes is not None:
                self._nodes.disconnect()

    def pipe_capable(self) -> bool:
        """False: RedisPipe and DirectConnection talk to one server. The pump's store uses one
        RedisPipe per master instead (node_pipes_capable, redis_cluster_pipe.py)."""
        return False

    def node_pipes_capable(self) -> bool:
        """True when the pump may send its hot path through one RedisPipe per master: not with
        redis_wait_replicas (WAIT rides on the pooled path only), nor with TLS checks that only
        redis-py makes (OCSP)."""
        return not self._closed and not self._wait and tls_supported(self.connection_kwargs())

    def connection_kwargs(self) -> dict[str, Any]:
        """The settings of a raw connection to any node (RedisPipe(address=...)): no host of its
        own, the credentials, the client name, and over TLS (`tls`) the ssl_* settings of redis-py's
        cluster connections (redis_topology.cluster_tls)."""
        tls = redis_topology.target(self.config).tls
        out: dict[str, Any] = {"host": None, "port": None, "path": None, "db": 0, "username": self._username,
                               "password": self._password, "client_name": f"xml-pipeline:{self._prefix}", "tls": tls}
        if tls:
            out.update(redis_topology.cluster_tls(self.config))
        return out

    def prepare_node_pipes(self) -> None:
        """(blocking) What the pump's cluster pipe needs before its first command, made off its
        event loop: the client with its slot map, and the script mechanism (probed once)."""
        self._do("connect", self._mechanism_now)

    def refresh_slots(self) -> None:
        """(blocking) Ask the cluster for its slot map again; a cluster none of whose nodes answers
        keeps the old map (the next attempt asks again)."""
        if self._client is not None:
            refresh(self._client)


def _random_id() -> bytes:
    # One id per call (96 random bits): every retry of the call carries it, so it is stored once.
    return os.urandom(12)


def _rebuild(config: BackendConfig, local_keys: tuple[bytes, ...] | None) -> RedisClusterBackend:
    return RedisClusterBackend(config, signer=Signer(local_keys, local=True) if local_keys else None)

