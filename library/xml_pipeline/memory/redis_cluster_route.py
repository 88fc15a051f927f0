"""Raw command batches on a Redis Cluster: RedisClusterBackend.send_commands.

The pump and the workers send batches of commands (a MULTI ... EXEC and a read after it) in one
write (RedisCore.send_commands). On a cluster a batch goes to the master of its keys' slot, on one
connection; the distributed mode's keys share a hash tag per organism so that their batches have
one slot (keys.ClusterKeys.key).

A worker's task loop sends its batches on connections of its own, one DirectConnection per master
(`NodeConnections`, RedisClusterBackend.use_direct_connection), as it does on one server: the same
commands and errors, without the pool's checkout per round trip.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from redis.exceptions import (AskError, ClusterDownError, MovedError, RedisClusterException, ResponseError,
                              TryAgainError)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..errors import BackendError
from .redis_direct import DirectConnection

__all__ = ["NodeConnections", "SlotMoving", "refresh", "send_routed"]


class NodeConnections:
    """One thread's DirectConnection to each master it sends to (made on first use, from the
    backend's connection settings with the node's address)."""

    def __init__(self, kwargs: dict[str, Any], *, socket_timeout: float, connect_timeout: float) -> None:
        self._kw = kwargs
        self._socket_timeout, self._connect_timeout = socket_timeout, connect_timeout
        self._conns: dict[str, DirectConnection] = {}
        self.owner = threading.get_ident()

    def to(self, node: Any) -> DirectConnection:
        conn = self._conns.get(node.name)
        if conn is None:
            conn = self._conns[node.name] = DirectConnection({**self._kw, "host": node.host, "port": node.port},
                                                             socket_timeout=self._socket_timeout,
                                                             connect_timeout=self._connect_timeout)
        return conn

    @property
    def round_trips(self) -> int:
        return sum(c.round_trips for c in self._conns.values())

    def disconnect(self) -> None:
        for conn in self._conns.values():
            conn.disconnect()


class SlotMoving(RedisConnectionError):
    """A command of the batch met a redirection (MOVED, ASK, TRYAGAIN, CLUSTERDOWN): a MULTI of
    the batch was refused whole (EXECABORT), so a batch that is one MULTI of one slot was not
    applied and may be sent again (the dispatcher's task submits do)."""


def send_routed(client: Any, commands: list[tuple[Any, ...]], best_effort_tail: int,
                pack: Callable[[list[tuple[Any, ...]]], bytes], direct: NodeConnections | None = None) -> list[Any]:
    """RedisCore.send_commands on a cluster: the commands go to the node of their keys' slot, on
    one connection, in one write. The pump's and workers' commands are built for that (their
    streams share a slot, keys.ClusterKeys.key); a single-key command of another slot (the
    response SET of a worker's MULTI) is sent first on its own node, and its reply put where it
    would have been (QUEUED in the MULTI, its result in EXEC's): the rest stays one
    transaction. A slot that moved is a connection error (the slot map is refreshed; callers
    retry as after a lost connection). `direct`: the calling thread's own connections, for the
    main batch."""
    slots = [None if c[0] in ("MULTI", "EXEC") else client.determine_slot(*c) for c in commands]
    keyed = [sl for sl in slots if sl is not None]
    if not keyed:
        raise BackendError("send_commands: no command names a key, there is no node to send them to")
    main = max(set(keyed), key=keyed.count)
    aside: dict[int, Any] = {}
    for i, (c, sl) in enumerate(zip(commands, slots)):
        if sl is not None and sl != main:
            try:
                aside[i] = client.execute_command(*c)
            except ResponseError as e:
                aside[i] = e
    here = [c for i, c in enumerate(commands) if i not in aside]
    replies = _on_node(client, main, here, best_effort_tail, pack, direct)
    if not aside:
        return replies
    out: list[Any] = []
    it = iter(replies)
    in_multi, queued = False, []
    for i, c in enumerate(commands):
        if i in aside:
            out.append(b"QUEUED" if in_multi else aside[i])
            if in_multi:
                queued.append(i)
            continue
        reply = next(it)
        if c[0] == "MULTI":
            in_multi, queued = True, []
        elif c[0] == "EXEC":
            in_multi = False
            if isinstance(reply, list):  # EXEC's results, with the set-aside ones in their places
                results = iter(reply)
                start = max(j for j, x in enumerate(commands[:i]) if x[0] == "MULTI")
                reply = [aside[j] if j in aside else next(results) for j in range(start + 1, i)]
        out.append(reply)
    return out

def refresh(client: Any) -> None:
    """Refresh the slot map after a connection error; if no node answers, the caller's connection
    error stands (an outage its retry waits out), not redis-py's RedisClusterException."""
    try:
        client.nodes_manager.initialize()
    except RedisClusterException:
        pass


def _on_node(client: Any, slot: int, commands: list[tuple[Any, ...]], best_effort_tail: int,
             pack: Callable[[list[tuple[Any, ...]]], bytes], direct: NodeConnections | None) -> list[Any]:
    """`commands` on one connection to the master of `slot`; replies as RedisCore._pipeline."""
    node = client.nodes_manager.get_node_from_slot(slot)
    if direct is not None:
        try:
            replies = direct.to(node).pipeline(pack(commands), len(commands), best_effort_tail=best_effort_tail)
        except (RedisConnectionError, RedisTimeoutError, OSError):
            refresh(client)  # the connection is dropped by DirectConnection; the next one asks the new map
            raise
        return _checked(client, slot, replies)
    pool = client.get_redis_connection(node).connection_pool
    try:
        conn = pool.get_connection()
    except (RedisConnectionError, RedisTimeoutError):
        # The node is gone: ask the cluster who serves the slot now (after a failover, the
        # promoted replica), for the caller's next attempt.
        refresh(client)
        raise
    try:
        conn.send_packed_command([pack(commands)])
        out: list[Any] = []
        for i in range(len(commands)):
            try:
                out.append(conn.read_response())
            except ResponseError as e:
                out.append(e)
            except (RedisConnectionError, RedisTimeoutError, OSError) as e:
                if i < len(commands) - best_effort_tail:
                    raise
                conn.disconnect()
                out.extend([e] * (len(commands) - i))
                break
    except (RedisConnectionError, RedisTimeoutError, OSError):
        conn.disconnect()
        refresh(client)
        raise
    except BaseException:
        conn.disconnect()
        raise
    finally:
        pool.release(conn)
    return _checked(client, slot, out)


def _checked(client: Any, slot: int, out: list[Any]) -> list[Any]:
    if any(isinstance(r, (MovedError, AskError, ClusterDownError, TryAgainError)) for r in out):
        refresh(client)
        raise SlotMoving(f"slot {slot} is moving or its node is failing over; the slot map was refreshed")
    return out
