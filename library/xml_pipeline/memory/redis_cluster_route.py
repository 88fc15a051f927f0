"""Raw command batches on a Redis Cluster: RedisClusterBackend.send_commands.

The pump and the workers send batches of commands (a MULTI ... EXEC and a read after it) in one
write (RedisCore.send_commands). On a cluster a batch goes to the master of its keys' slot, on one
connection; the distributed mode's keys share a hash tag per organism so that their batches have
one slot (keys.ClusterKeys.key).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from redis.exceptions import (AskError, ClusterDownError, MovedError, RedisClusterException, ResponseError,
                              TryAgainError)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..errors import BackendError

__all__ = ["SlotMoving", "send_routed"]


class SlotMoving(RedisConnectionError):
    """A command of the batch met a redirection (MOVED, ASK, TRYAGAIN, CLUSTERDOWN): a MULTI of
    the batch was refused whole (EXECABORT), so a batch that is one MULTI of one slot was not
    applied and may be sent again (the dispatcher's task submits do)."""


def send_routed(client: Any, commands: list[tuple[Any, ...]], best_effort_tail: int,
                pack: Callable[[list[tuple[Any, ...]]], bytes]) -> list[Any]:
    """RedisCore.send_commands on a cluster: the commands go to the node of their keys' slot, on
    one connection, in one write. The pump's and workers' commands are built for that (their
    streams share a slot, keys.ClusterKeys.key); a single-key command of another slot (the
    response SET of a worker's MULTI) is sent first on its own node, and its reply put where it
    would have been (QUEUED in the MULTI, its result in EXEC's): the rest stays one
    transaction. A slot that moved is a connection error (the slot map is refreshed; callers
    retry as after a lost connection)."""
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
    replies = _on_node(client, main, here, best_effort_tail, pack)
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

def _refresh(client: Any) -> None:
    """Refresh the slot map after a connection error; if no node answers, the caller's connection
    error stands (an outage its retry waits out), not redis-py's RedisClusterException."""
    try:
        client.nodes_manager.initialize()
    except RedisClusterException:
        pass


def _on_node(client: Any, slot: int, commands: list[tuple[Any, ...]], best_effort_tail: int,
         pack: Callable[[list[tuple[Any, ...]]], bytes]) -> list[Any]:
    """`commands` on one connection to the master of `slot`; replies as RedisCore._pipeline."""
    node = client.nodes_manager.get_node_from_slot(slot)
    pool = client.get_redis_connection(node).connection_pool
    try:
        conn = pool.get_connection()
    except (RedisConnectionError, RedisTimeoutError):
        # The node is gone: ask the cluster who serves the slot now (after a failover, the
        # promoted replica), for the caller's next attempt.
        _refresh(client)
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
        _refresh(client)
        raise
    except BaseException:
        conn.disconnect()
        raise
    finally:
        pool.release(conn)
    if any(isinstance(r, (MovedError, AskError, ClusterDownError, TryAgainError)) for r in out):
        _refresh(client)
        raise SlotMoving(f"slot {slot} is moving or its node is failing over; the slot map was refreshed")
    return out
