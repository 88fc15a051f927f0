"""ClusterPipe: the pump's group commit (redis_pipe.py) on a Redis Cluster, one RedisPipe per master.

Each operation of the pump's hot path goes to the master of its keys' hash slot, on that master's
RedisPipe: the commands written to one master during one loop iteration still leave in one write.
Which master serves a slot is the blocking backend's own slot map (the NodesManager of
RedisClusterBackend.client): the pipes and the io threads route alike, and what one of them learns
(a MOVED, a fresh map after a node was lost) the other uses at once.

What an operation sends, by slot (keys.ClusterKeys):

- append_at: the compare-and-append (C_APPEND, the thread's three keys: one slot) on the thread's
  master and the SET EX of each temp item on the item's own master, in the same loop iteration;
  then, where the script's reply calls for them (a new thread, an expiry refresh that is due), the
  index and expiry commands on theirs (RedisClusterBackend.append_follow_ups, as the blocking path);
- take: GET + DEL on the key's master, DEL of the other keys on theirs; delete: one DEL per slot;
- execute (the dispatcher's stream commands): the batch on the master of its slot (a task bucket's
  MULTI, the read of the organism's results stream); a batch that spans slots goes through the
  blocking backend, whose send_commands splits it (redis_cluster_route.py).

A cluster's "not here, not now" replies (MOVED, ASK, TRYAGAIN, CLUSTERDOWN, UNBLOCKED) mean that the
command did not run. They never reach the caller:

- MOVED updates the shared slot map for that slot at once (NodesManager.move_slot); a lost
  connection to a node, or a slot no master serves, asks the cluster for a fresh map (in an io
  thread, one refresh at a time), so the next batch goes to the slot's owner of now;
- append_at raises Unsure for anything but a plain answer, and the store redoes the append through
  the blocking backend (async_store.py), which follows redirections and waits out a failover;
- take and delete are redone through the blocking backend in the same case (`run`: the store's io
  threads), only the DELs where the GET of a take has answered. A take whose connection was lost is
  redone too: the blocking take's GET is retried through a failover. If the lost GET + DEL had run,
  that GET finds nothing and the take answers None (the pump reports the response as gone);
- execute resends a batch none of whose commands ran, for up to RETRY_SECONDS: to the new owner after
  MOVED, with ASKING to the importing node after ASK, after a short backoff for TRYAGAIN,
  CLUSTERDOWN and UNBLOCKED, and when its master could not be reached at all (nothing was sent:
  after a fresh slot map); then BackendUnavailable. A batch that ran in part returns its replies
  with the errors in place, and a connection lost under a batch is BackendUnavailable, as on one
  server (a MULTI of XADDs is not repeated blindly).
"""
from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from redis.crc import key_slot
from redis.exceptions import AskError, ClusterDownError, MovedError, ResponseError, SlotNotCoveredError, TryAgainError

from ..errors import BackendError, BackendUnavailable
from .keys import check_tagged_id
from .protocol import Appended
from .redis_pipe import RedisPipe, Unsure
from .redis_wire import Packed, join_packed, pack_command, pack_commands

if TYPE_CHECKING:
    from .redis_cluster import RedisClusterBackend

__all__ = ["ClusterPipe", "RETRY_SECONDS", "not_here"]

#: How long execute resends a batch the cluster refused as a whole (about a failover's length,
#: redis_topology.FAILOVER_RETRIES); then BackendUnavailable.
RETRY_SECONDS = 10.0
_ASKING = pack_command(b"ASKING", [])
_REFUSED = (AskError, TryAgainError, ClusterDownError)  # MovedError and MasterDownError are subclasses


def not_here(reply: object) -> bool:
    """True for a reply by which the cluster refused a command without running it."""
    return isinstance(reply, _REFUSED) or (type(reply) is ResponseError and str(reply).startswith("UNBLOCKED"))


class _NotSent(BackendUnavailable):
    """Nothing was sent: no master serves the slot now, or its master cannot be reached (during a
    failover, until the fresh slot map names the promoted replica)."""


def _slot(key: str) -> int:
    return key_slot(key.encode())


class ClusterPipe:
    """One RedisPipe per master of a RedisClusterBackend, for one event loop (the pump's).
    `run(fn, *args)` runs a blocking call of the backend off the loop (the store's io threads)."""

    def __init__(self, backend: "RedisClusterBackend", run: Callable[..., Awaitable[Any]]) -> None:
        self.backend = backend
        self._run = run
        self._pipes: dict[str, RedisPipe] = {}
        self._refreshing: asyncio.Future[Any] | None = None
        #: Per node: done once an EVAL of the append script was answered there (the "eval" mechanism).
        self._scripted: dict[str, asyncio.Future[None]] = {}
        self._closed = False
        #: MOVED / ASK replies met, slot-map refreshes asked for, and takes / deletes / batches redone
        #: through the blocking backend (tests and benchmarks read them).
        self.redirects = 0
        self.refreshes = 0
        self.fallbacks = 0

    # -- what tests and the pump's stats read ---------------------------------------------------------
    @property
    def writes(self) -> int:
        return sum(p.writes for p in self._pipes.values())

    @property
    def commands(self) -> int:
        return sum(p.commands for p in self._pipes.values())

    def node_commands(self) -> dict[str, int]:
        """Commands sent per node ("host:port")."""
        return {name: p.commands for name, p in self._pipes.items()}

    # -- routing --------------------------------------------------------------------------------------
    async def _prepare(self) -> None:
        """The client, its slot map and the script mechanism exist (they are made with blocking
        calls: in the io threads, never in the loop)."""
        if self.backend.script_mechanism is None:
            await self._run(self.backend.prepare_node_pipes)

    def _pipe_at(self, host: str, port: int) -> RedisPipe:
        name = f"{host}:{port}"
        pipe = self._pipes.get(name)
        if pipe is None:
            if self._closed:
                raise BackendUnavailable(f"the cluster pipe to {self.backend.url} is closed")
            pipe = self._pipes[name] = RedisPipe(self.backend, address=(host, port))
        return pipe

    def _refresh(self) -> None:
        """Ask for a fresh slot map in an io thread, unless a refresh is under way."""
        if self._closed or (self._refreshing is not None and not self._refreshing.done()):
            return
        self.refreshes += 1
        self._refreshing = asyncio.ensure_future(self._run(self.backend.refresh_slots))
        self._refreshing.add_done_callback(lambda f: f.cancelled() or f.exception())

    def _learn(self, replies: list[Any]) -> None:
        for r in replies:
            if isinstance(r, MovedError):
                self.redirects += 1
                try:
                    self.backend.client.nodes_manager.move_slot(r)
                except Exception:  # noqa: BLE001 - a map it cannot patch (slot unknown): ask for a new one
                    self._refresh()
            elif isinstance(r, AskError):
                self.redirects += 1

    def _master(self, slot: int) -> Any:
        """The master of `slot` in the client's slot map (read as NodesManager.get_node_from_slot
        reads it, without its lock and argument checks: a dict read, on every command)."""
        nodes = self.backend.client.nodes_manager.slots_cache.get(slot)
        if not nodes:
            raise SlotNotCoveredError(f"slot {slot} is not covered")
        return nodes[0]

    def _node_of(self, slot: int) -> str:
        """The name ("host:port") of the master of `slot` in the slot map ("" if none serves it)."""
        try:
            return str(self._master(slot).name)
        except SlotNotCoveredError:
            return ""

    async def _send(self, slot: int, packed: Packed, count: int, what: str) -> list[Any]:
        """`packed` (commands of `slot`) on its master's pipe: their replies, error replies in place.
        A node that cannot be reached is BackendUnavailable, and a fresh slot map is asked for."""
        try:
            node = self._master(slot)
        except SlotNotCoveredError:
            self._refresh()
            raise _NotSent(f"Redis Cluster at {self.backend.url}: no master serves slot {slot} now ({what})") from None
        pipe = self._pipe_at(node.host, node.port)
        try:
            await pipe.connect(what)
        except BackendUnavailable as e:  # a master that is gone: ask for a fresh map, nothing was sent
            self._refresh()
            raise _NotSent(str(e)) from None
        try:
            replies = await pipe.execute(packed, count, what=what)
        except BackendUnavailable:
            self._refresh()
            raise
        self._learn(replies)
        return replies

    def _by_slot(self, keys: Sequence[str]) -> dict[int, list[int]]:
        """Positions of `keys` grouped by hash slot, in order."""
        out: dict[int, list[int]] = {}
        for i, k in enumerate(keys):
            out.setdefault(_slot(k), []).append(i)
        return out

    # -- the pump's operations ------------------------------------------------------------------------
    async def append_at(self, thread_id: str, slot: bytes, index: int, *, max_slots: int | None,
                        append_id: str, items: Sequence[tuple[str, bytes]]) -> Appended:
        """The backend's buffer_append_at. Raises Unsure unless the script answered stored, moved or
        repeat and every other command answered (the store redoes the append through the backend)."""
        b = self.backend
        loading: asyncio.Future[None] | None = None
        try:
            await self._prepare()
            key = b.keys.buffer(thread_id)
            if b.script_mechanism == "eval":
                # The first append on a node is an EVAL, which caches the script there; the appends
                # of the same burst wait for it instead of all meeting NOSCRIPT.
                node = self._node_of(_slot(key))
                loaded = self._scripted.get(node)
                if loaded is None:
                    loading = self._scripted[node] = asyncio.get_running_loop().create_future()
                elif not loaded.done():
                    await asyncio.shield(loaded)
            key, command = b.append_command(thread_id, slot, index, max_slots=max_slots, append_id=append_id,
                                            load=loading is not None)
            names = [b.keys.tmp(check_tagged_id(k, "temp key")) for k, _ in items]
            append = self._send(_slot(key), pack_commands([command]), 1, "buffer_append")
            if items:
                sends = [append]
                for s, where in self._by_slot(names).items():
                    puts = b._pack_sets([names[i] for i in where], [items[i][1] for i in where])  # noqa: SLF001
                    sends.append(self._send(s, puts, len(where), "temp_put"))
                results: list[Any] = await asyncio.gather(*sends, return_exceptions=True)
            else:  # no task of its own for the common case
                try:
                    results = [await append]
                except Exception as e:  # noqa: BLE001 - judged below, as gather's results are
                    results = [e]
        except BackendError as e:
            raise Unsure(str(e)) from None
        finally:
            if loading is not None:
                loading.set_result(None)
        for res in results:
            if isinstance(res, BaseException):
                if not isinstance(res, Exception):
                    raise res
                raise Unsure(f"{type(res).__name__}: {res}"[:200])
            if any(isinstance(r, Exception) for r in res):
                raise Unsure(f"append replied {res!r}"[:200])
        reply = results[0][0]
        try:
            outcome = b.append_outcome(reply)
        except BackendError:
            outcome = None
        if outcome is None:  # a full thread: the backend raises ThreadFullError and deletes the items
            raise Unsure(f"append replied {reply!r}"[:200])
        follow = b.append_follow_ups(thread_id, reply)
        if follow:
            await self._follow_up(follow)
        return outcome

    async def _follow_up(self, commands: list[tuple[Any, ...]]) -> None:
        """Single-key commands of other slots (index entry, expiry refreshes), each on its master."""
        groups = self._by_slot([str(c[1]) for c in commands])
        results = await asyncio.gather(*(self._send(s, pack_commands([commands[i] for i in where]), len(where),
                                                    "buffer_append") for s, where in groups.items()),
                                       return_exceptions=True)
        for res in results:
            if isinstance(res, BaseException) or any(isinstance(r, Exception) for r in res):
                raise Unsure(f"index or expiry update replied {res!r}"[:200])

    async def take(self, key: str, *also_delete: str) -> bytes | None:
        """The backend's temp_take: GET key, DEL key and `also_delete` (module docstring: what is
        redone through the blocking backend)."""
        b = self.backend
        ids = (key, *also_delete)
        names = [b.keys.tmp(check_tagged_id(k, "temp key")) for k in ids]
        groups = self._by_slot(names)
        first = _slot(names[0])
        try:
            await self._prepare()
            sends = []
            for s, where in groups.items():
                dele = pack_command(b"DEL", [names[i] for i in where])
                if s == first:
                    sends.append(self._send(s, pack_command(b"GET", names[:1]) + dele, 2, "temp_get+delete"))
                else:
                    sends.append(self._send(s, dele, 1, "temp_delete"))
            results = await asyncio.gather(*sends, return_exceptions=True)
        except BackendError:
            results = [BackendUnavailable("not sent")] * len(groups)
        got: Any = None
        redo: list[str] = []
        for (s, where), res in zip(groups.items(), results):
            if s == first:
                if isinstance(res, BaseException) or isinstance(res[0], Exception):
                    if isinstance(res, BaseException) and not isinstance(res, Exception):
                        raise res
                    self.fallbacks += 1
                    return await self._run(b.temp_take, key, *also_delete)
                got = res[0]
                res = res[1:]
            if isinstance(res, BaseException) or isinstance(res[0], Exception):
                redo += [ids[i] for i in where]
        if redo:
            self.fallbacks += 1
            await self._run(b.temp_delete, *redo)
        return got

    async def delete(self, *keys: str) -> int:
        """The backend's temp_delete: one DEL per slot; a DEL the pipe cannot confirm is redone
        through the blocking backend."""
        if not keys:
            return 0
        b = self.backend
        names = [b.keys.tmp(check_tagged_id(k, "temp key")) for k in keys]
        groups = self._by_slot(names)
        try:
            await self._prepare()
            results = await asyncio.gather(*(self._send(s, pack_command(b"DEL", [names[i] for i in where]), 1,
                                                        "temp_delete") for s, where in groups.items()),
                                           return_exceptions=True)
        except BackendError:
            results = [BackendUnavailable("not sent")] * len(groups)
        n = 0
        redo: list[str] = []
        for where, res in zip(groups.values(), results):
            if isinstance(res, BaseException) and not isinstance(res, Exception):
                raise res
            if isinstance(res, Exception) or not isinstance(res[0], int):
                redo += [keys[i] for i in where]
            else:
                n += res[0]
        if redo:
            self.fallbacks += 1
            n += await self._run(b.temp_delete, *redo)
        return n

    async def execute(self, commands: list[tuple[Any, ...]], *, what: str) -> list[Any]:
        """Commands of one slot (a MULTI ... EXEC, or a read) on its master's pipe in the next group
        write; their replies, error replies in place (module docstring: what is resent)."""
        b = self.backend
        await self._prepare()
        slot = self._batch_slot(commands)
        if slot is None:  # several slots (or none): the backend splits it, or says what is wrong
            self.fallbacks += 1
            return await self._run(functools.partial(b.execute, lambda _client: b.send_commands(commands),
                                                     idempotent=False, what=what))
        packed = pack_commands(commands)
        deadline = time.monotonic() + RETRY_SECONDS
        delay = 0.02
        asking: AskError | None = None
        while True:
            try:
                if asking is not None:
                    replies = await self._asking(asking, commands, what)
                else:
                    replies = await self._send(slot, packed, len(commands), what)
            except _NotSent:
                if time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)
                continue
            keyed = [r for c, r in zip(commands, replies) if c[0] not in ("MULTI", "EXEC")]
            if not keyed or not all(not_here(r) for r in keyed):
                return replies  # ran (in part, where some were refused: the errors are in place)
            if time.monotonic() >= deadline:
                raise BackendUnavailable(f"Redis Cluster at {b.url}: {what} was refused for {RETRY_SECONDS:g} s "
                                         f"(slot {slot}: {b.scrub(keyed[0])})")
            first = keyed[0]
            asking = first if isinstance(first, AskError) and not isinstance(first, MovedError) else None
            if not isinstance(first, AskError):  # TRYAGAIN, CLUSTERDOWN, UNBLOCKED: wait a little
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)

    def _batch_slot(self, commands: list[tuple[Any, ...]]) -> int | None:
        """The one slot of a batch's keyed commands (the backend's client computes it), else None."""
        slots = set()
        client = self.backend.client
        for c in commands:
            if c[0] in ("MULTI", "EXEC"):
                continue
            try:
                slots.add(client.determine_slot(*c))
            except Exception:  # noqa: BLE001 - no key, or keys of several slots: the blocking path says
                return None
        return slots.pop() if len(slots) == 1 else None

    async def _asking(self, ask: AskError, commands: list[tuple[Any, ...]], what: str) -> list[Any]:
        """The batch on the node importing its slot, each command allowed there by ASKING (one
        ASKING before a MULTI covers the transaction); the ASKING replies are left out."""
        if commands[0][0] == "MULTI":
            packed, mine = join_packed(_ASKING, pack_commands(commands)), [0]
        else:
            packed = b"".join(_ASKING + pack_commands([c]) for c in commands)
            mine = list(range(0, 2 * len(commands), 2))
        try:
            replies = await self._pipe_at(ask.host, int(ask.port)).execute(packed, len(commands) + len(mine), what=what)
        except BackendUnavailable:
            self._refresh()
            raise
        skip = set(mine)
        out = [r for i, r in enumerate(replies) if i not in skip]
        self._learn(out)
        return out

    def close(self) -> None:
        self._closed = True
        for pipe in self._pipes.values():
            pipe.close()
