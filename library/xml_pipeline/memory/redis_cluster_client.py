"""ClusterClient: redis-py's RedisCluster, with key lookups that never pin a dead node.

To route a command whose keys are not at fixed positions (XREADGROUP, XREAD, FCALL: "movable
keys"), redis-py asks the cluster's *default node* (`COMMAND GETKEYS`), before its own retry loop.
When that node dies, the lookup fails with a connection error that redis-py does not handle: no
slot-map refresh, no new default node. The default node is only replaced by a refresh that some
other command's connection error triggers, and a refresh during a failover (before the replica is
promoted) names the dead master again. A process whose every command has movable keys (a worker:
XREADGROUP on its stream, the chained read of its MULTI) then asks the dead address forever.

This client:

- finds the keys of XREADGROUP, XREAD, FCALL and FCALL_RO itself (their syntax fixes where the keys
  are), so the commands a pump or worker sends on its hot path ask no node before being routed (a
  round trip saved per command as well);
- for any other command with movable keys, when the lookup meets a connection error, replaces the
  default node with another master and refreshes the slot map, then asks once more; if that fails
  too the connection error is raised for the caller's retry, which asks another node again;
- reports a cluster none of whose nodes answers as a connection error (redis-py raises
  RedisClusterException from the slot-map refresh), so loops that wait out an outage (a worker's)
  wait it out instead of stopping.

So after a node dies every attempt is routed by a slot map that redis-py refreshed on the previous
attempt's connection error (the dead node asked last): an attempt after the promotion reaches the
new master (docs/storage.md, "The pump's streams", states the bound).
"""
from __future__ import annotations

from typing import Any

from redis.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException
from redis.exceptions import TimeoutError as RedisTimeoutError

__all__ = ["ClusterClient", "command_keys"]

#: Options of XREAD / XREADGROUP before STREAMS and how many values each takes.
_STREAM_OPTIONS = {b"COUNT": 1, b"BLOCK": 1, b"NOACK": 0}


def _word(arg: Any) -> bytes | None:
    if isinstance(arg, str):
        return arg.upper().encode()
    if isinstance(arg, (bytes, bytearray, memoryview)):
        return bytes(arg).upper()
    return None


def command_keys(args: tuple[Any, ...]) -> list[Any] | None:
    """The keys of XREADGROUP / XREAD / FCALL / FCALL_RO `args` (the command first), from their
    syntax; None for any other command, or when the arguments do not parse (the server then says
    what is wrong with them)."""
    name = _word(args[0]) if args else None
    if name in (b"FCALL", b"FCALL_RO"):
        try:
            count = int(args[2])
        except (IndexError, TypeError, ValueError):
            return None
        if count < 0 or len(args) < 3 + count:
            return None
        return list(args[3:3 + count])
    if name == b"XREADGROUP":
        i = 4  # XREADGROUP GROUP <group> <consumer> ...
        if len(args) < i or _word(args[1]) != b"GROUP":
            return None
    elif name == b"XREAD":
        i = 1
    else:
        return None
    while i < len(args):
        word = _word(args[i])
        if word == b"STREAMS":
            rest = args[i + 1:]
            if not rest or len(rest) % 2:
                return None
            return list(rest[:len(rest) // 2])
        if word not in _STREAM_OPTIONS:
            return None
        i += 1 + _STREAM_OPTIONS[word]
    return None


class ClusterClient(RedisCluster):
    """RedisCluster whose key lookups do not depend on one node staying up (module docstring)."""

    def _execute_command(self, target_node: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return super()._execute_command(target_node, *args, **kwargs)
        except RedisClusterException as e:
            # The slot-map refresh after a connection error found no node answering: that is an
            # outage (a connection error, which callers wait out), not a wrong use of the cluster.
            if isinstance(e.__context__, (RedisConnectionError, RedisTimeoutError)):
                raise RedisConnectionError(f"no node of the cluster answers: {e}") from None
            raise

    def _get_command_keys(self, *args: Any) -> Any:
        keys = command_keys(args)
        if keys is not None:
            return keys
        try:
            return super()._get_command_keys(*args)
        except (RedisConnectionError, RedisTimeoutError) as e:
            # The default node is unreachable: a fresh slot map, and another master for the lookups
            # from now on (a refresh during a failover may name the dead node again), then once more.
            failed = self.get_default_node()
            try:
                self.nodes_manager.initialize(last_failed_node_name=failed.name if failed else None)
            except RedisClusterException:  # no node answered: an outage, for the caller's retry
                raise e from None
            if failed is None or self.get_default_node().name == failed.name:
                self.replace_default_node()
            return super()._get_command_keys(*args)
