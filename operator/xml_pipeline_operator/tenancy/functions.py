"""The library's Lua as a Redis Functions library on the shared Redis: tenants FCALL it, never EVAL.

Tenant users are granted FCALL/FCALL_RO and denied EVAL, EVALSHA, SCRIPT and FUNCTION (acl.py), so the
only Lua a tenant can run is what the operator loads here: the library generated from the library's
own scripts (xml_pipeline.memory.redis_functions). Its name carries its version, so loading it leaves
other versions (pods of an older release during an upgrade) in place.

Functions are kept in the server's RDB/AOF like data, but a server restarted without persistence, a
FUNCTION FLUSH, or a new server after a failover has none: `ensure_library` (one FCALL_RO when
nothing is missing) is run before the first user is made and again by the operator's periodic check,
which loads it back, as it re-creates lost ACL users.
"""
from __future__ import annotations

import enum

import redis
from xml_pipeline.memory.redis_functions import FunctionLibrary, library, probe_reply_ok


class LibraryState(enum.Enum):
    PRESENT = "present"
    LOADED = "loaded"


class FunctionsUnsupported(Exception):
    """The shared Redis has no FUNCTION commands (Redis < 7): tenants could not run the library."""


def library_loaded(admin: redis.Redis, lib: FunctionLibrary | None = None) -> bool:
    """True when this version of the library is loaded (its version function answers)."""
    lib = lib or library()
    try:
        return probe_reply_ok(admin.execute_command("FCALL_RO", lib.version_function, 0), lib)
    except redis.ResponseError as e:
        if "unknown command" in str(e).lower():
            raise FunctionsUnsupported(
                "the shared Redis does not know FCALL (Redis Functions need Redis >= 7.0 or Valkey >= 8.0): "
                "tenants there could not run the library's scripts") from None
        if "function not found" in str(e).lower():
            return False
        raise


def ensure_library(admin: redis.Redis, lib: FunctionLibrary | None = None) -> LibraryState:
    """Load the library unless this version is already there (FUNCTION LOAD REPLACE: idempotent)."""
    lib = lib or library()
    if library_loaded(admin, lib):
        return LibraryState.PRESENT
    admin.execute_command("FUNCTION", "LOAD", "REPLACE", lib.text)
    return LibraryState.LOADED
