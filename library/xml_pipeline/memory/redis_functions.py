"""The library's Lua scripts as one Redis Functions library, and how a client picks FCALL or EVALSHA.

On a shared Redis a tenant allowed EVAL could run any Lua it likes: a loop that has written once
cannot be stopped by SCRIPT KILL (only SHUTDOWN NOSAVE ends it, losing every tenant's data). So
there the operator loads this library (FUNCTION LOAD REPLACE, admin only) and grants tenants FCALL
and FCALL_RO but neither EVAL/EVALSHA nor SCRIPT nor FUNCTION: a tenant can run our functions and
nothing else.

Single source: the library text is generated from the scripts themselves (redis_scripts.ALL and the
pump's and workers' scripts in message_bus.streams.SCRIPTS), each script body wrapped in a Lua
function taking (KEYS, ARGV), so an edit to a script changes the library with it. The version is a
digest of the generated text and is part of the library name and of every function name
(`xp_<version>_<script>`): two versions can be loaded side by side (pods of an older release keep
working during a rollout), and a client never calls a function whose body differs from its own
script.

Clients detect the mechanism once per connection pool (`probe`): FCALL_RO of the library's
`xp_<version>_version` function (no keys, read-only) answers the version when this exact library is
loaded; any error (function not found, NOPERM, a server without FUNCTION) means EVALSHA/EVAL, which
is what a dedicated or external Redis without the library keeps using.
"""
from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable
from typing import Any, Literal

from redis.exceptions import ResponseError

from .redis_scripts import ALL as BACKEND_SCRIPTS
from .redis_scripts import LuaScript

__all__ = ["FunctionLibrary", "Mechanism", "ScriptHeads", "library", "mechanism_error", "probe_reply_ok"]

Mechanism = Literal["fcall", "eval"]

#: Library names start with this; the version follows.
LIBRARY_PREFIX = "xmlpipeline_"


class FunctionLibrary:
    """The generated library: its name, version, text, and the function name of each script."""

    def __init__(self, scripts: tuple[LuaScript, ...]) -> None:
        names = [s.name for s in scripts]
        if len(set(names)) != len(names):
            raise ValueError(f"script names must be unique, got {names}")
        body = "".join(_wrap(i, s) for i, s in enumerate(scripts))
        self.version = hashlib.sha1(body.encode()).hexdigest()[:12]
        self.name = LIBRARY_PREFIX + self.version
        self.scripts = scripts
        self.functions = {s.name: f"xp_{self.version}_{s.name}" for s in scripts}
        self.version_function = f"xp_{self.version}_version"
        registrations = "".join(
            f"redis.register_function{{function_name='{self.functions[s.name]}', callback=_xp{i}}}\n"
            for i, s in enumerate(scripts))
        self.text = (f"#!lua name={self.name}\n{body}{registrations}"
                     f"redis.register_function{{function_name='{self.version_function}', "
                     f"callback=function() return '{self.version}' end, flags={{'no-writes'}}}}\n")

    def function(self, script: LuaScript) -> str:
        """The FCALL name of `script` (KeyError if it is not one of the library's scripts)."""
        return self.functions[script.name]


def _wrap(i: int, script: LuaScript) -> str:
    # Scripts read the globals KEYS and ARGV; a function gets them as arguments, so the body is
    # wrapped in a function whose parameters carry those names. The body's top-level `return`
    # becomes the function's return. Functions always replicate effects and have no
    # redis.replicate_commands (scripts call it for Redis 6.2), so that call is dropped.
    source = script.source.replace("redis.replicate_commands()", "")
    return f"local function _xp{i}(KEYS, ARGV)\n{source}\nend\n"


@functools.lru_cache(maxsize=1)
def library() -> FunctionLibrary:
    """The library of this release: the backend's scripts and the distributed mode's."""
    from ..message_bus.streams import SCRIPTS as DISTRIBUTED_SCRIPTS  # late: message_bus builds on memory
    from .redis_cluster_scripts import ALL as CLUSTER_SCRIPTS  # the cluster mode's one-slot scripts
    return FunctionLibrary((*BACKEND_SCRIPTS, *CLUSTER_SCRIPTS, *DISTRIBUTED_SCRIPTS))


def probe_reply_ok(reply: Any, lib: FunctionLibrary | None = None) -> bool:
    """True when a probe (FCALL_RO <version function> 0) answered the version of `lib` (default:
    this release's library)."""
    value = reply.decode() if isinstance(reply, (bytes, bytearray)) else reply
    return value == (lib or library()).version


def mechanism_error(error: Exception) -> bool:
    """True when `error` says the chosen mechanism is unavailable (not that the script failed): the
    function is not loaded (a restart, a FLUSHALL, a newer library), or this user may not run
    FCALL / EVAL / EVALSHA / SCRIPT LOAD, or the server has no FUNCTION commands."""
    text = str(error)
    low = text.lower()
    if "function not found" in low or "noscript" in low:
        return True
    if "unknown command" in low and ("fcall" in low):
        return True
    if "no permissions to run the" in low or text.startswith("NOPERM"):
        return any(f"'{c}'" in low for c in ("fcall", "fcall_ro", "eval", "evalsha", "script|load"))
    return False


class ScriptHeads:
    """The packed RESP heads ("FCALL <function> <numkeys>" or "EVALSHA <sha> <numkeys>") of the
    library's scripts for one server, and which mechanism that server was probed to support.

    `pack_head(command, name, numkeys, nargs)` packs one head (the backend's packer, so the bytes are
    exactly what it sends). Thread-safe enough for a pool: a stale head is detected by `matches` and
    repacked by `rehead`, never sent for the wrong mechanism twice.
    """

    def __init__(self, scripts: tuple[LuaScript, ...], pack_head: Callable[[bytes, bytes, int, int], bytes]) -> None:
        self._scripts = scripts
        self._pack = pack_head
        self.mechanism: Mechanism | None = None
        self._evalsha = {s.name: pack_head(b"EVALSHA", s.sha.encode(), s.numkeys, s.nargs)
                         for s in scripts if s.nargs >= 0}
        #: Heads of the fixed-arity scripts (nargs >= 0) for the mechanism in use.
        self.current = self._evalsha

    def probe(self, send: Callable[..., Any]) -> Mechanism:
        """Ask the server (`send(*command)` returns the reply or raises redis-py's errors) whether our
        library of this version is loaded and callable; set the mechanism and the heads to match.
        A connection error is raised and changes nothing."""
        lib = library()
        try:
            mechanism: Mechanism = "fcall" if probe_reply_ok(send("FCALL_RO", lib.version_function, 0)) else "eval"
        except ResponseError:
            mechanism = "eval"
        if mechanism == "fcall":
            self.current = {s.name: self._pack(b"FCALL", lib.function(s).encode(), s.numkeys, s.nargs)
                            for s in self._scripts if s.nargs >= 0}
        else:
            self.current = self._evalsha
        self.mechanism = mechanism
        return mechanism

    def head(self, script: LuaScript, nargs: int) -> bytes:
        """The head of `script` with `nargs` arguments for the mechanism in use."""
        if self.mechanism == "fcall":
            return self._pack(b"FCALL", library().function(script).encode(), script.numkeys, nargs)
        return self._pack(b"EVALSHA", script.sha.encode(), script.numkeys, nargs)

    def matches(self, head: bytes) -> bool:
        """True when `head` was packed for the mechanism in use."""
        return (b"\r\nFCALL\r\n" in head[:16]) == (self.mechanism == "fcall")

    def rehead(self, head: bytes, script: LuaScript) -> bytes:
        """`head` (of `script`, either mechanism) packed again for the mechanism in use."""
        nargs = int(head[1:head.index(b"\r\n")]) - 3 - script.numkeys
        return self.head(script, nargs)

    def unavailable(self, error: Exception, user: str, scrubbed: str) -> ResponseError:
        """Neither our function library nor EVAL is available to `user`: forget the probe (the next
        call probes again: the operator reloads the library) and say what to do."""
        self.mechanism = None
        return ResponseError(
            f"cannot run the {library().name} scripts: the function library is not loaded on this server "
            f"and user {user!r} may not EVAL/EVALSHA ({scrubbed}); on a shared Redis the operator loads "
            "the library within its 30 s check; elsewhere grant EVALSHA and EVAL")
