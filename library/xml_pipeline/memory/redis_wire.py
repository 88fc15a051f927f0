"""RESP on the wire for the library's own Redis connections: packing commands.

RedisBackend's pooled connections, the pump's RedisPipe and a worker's DirectConnection send
commands packed here. The packer is ours because it is small and the hot path packs the append's
KEYS and ARGV in one `%` format (redis-py encodes argument by argument): it handles exactly the
argument types our commands take (str, bytes, int) and is tested byte for byte against redis-py's
own packer (tests/library/test_redis_wire.py).
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["pack_args", "pack_command", "pack_commands", "pack_head"]


def pack_head(command: bytes, script: bytes, numkeys: int, nargs: int) -> bytes:
    """The head "<command> <script> <numkeys>" of a script call with `numkeys` keys and `nargs`
    arguments (EVALSHA <sha>, EVAL <source>, FCALL <function>); the keys and arguments follow."""
    count = 3 + numkeys + nargs
    nk = str(numkeys).encode()
    return b"*%d\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n" % (
        count, len(command), command, len(script), script, len(nk), nk)


def pack_args(args: Iterable[Any]) -> bytes:
    """RESP bulk strings for str / bytes / int arguments (the only types our commands take)."""
    out = []
    for a in args:
        if isinstance(a, str):
            a = a.encode()
        elif isinstance(a, int):
            a = b"%d" % a
        elif not isinstance(a, bytes):
            a = bytes(a)
        out.append(b"$%d\r\n%b\r\n" % (len(a), a))
    return b"".join(out)


def pack_command(command: bytes, args: list[Any]) -> bytes:
    """One command: `command` and its arguments."""
    return b"*%d\r\n$%d\r\n%b\r\n" % (len(args) + 1, len(command), command) + pack_args(args)


def pack_commands(commands: list[tuple[Any, ...]]) -> bytes:
    """Commands (tuples of str / bytes / int) in RESP, back to back."""
    return b"".join(pack_command(str(c[0]).encode(), list(c[1:])) for c in commands)
