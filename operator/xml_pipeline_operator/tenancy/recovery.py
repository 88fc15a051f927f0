"""Redis forgets, the operator remembers: re-create organism users a shared Redis has lost.

A Redis that restarts without an ACL file (or with a stale one) comes back without the users the
operator made. Pods then fail to authenticate on their next reconnect (WRONGPASS), and keep
retrying. The operator's periodic check notices and re-creates the users from the desired state
(the Organisms and their Secrets); the pods' next attempt succeeds and their backends recover
without a restart.

One check costs three round trips when nothing is wrong: `INFO server` (has the server restarted?
its run_id changes), `ACL USERS` (is anyone missing?) and an FCALL_RO of the function library's
version function (is the library tenants FCALL still loaded? functions.py). After a restart every desired user is
re-applied (ensure_user compares first, so unchanged users cost one ACL GETUSER each), which also
repairs users an old ACL file brought back with stale passwords or rules.
"""
from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass, field

import redis

from .acl import Change, ServerProfile, ensure_user, list_users, server_profile
from .functions import LibraryState, ensure_library


@dataclass(frozen=True)
class DesiredUser:
    """What one organism's user must look like (from the Organism and its Secret)."""

    username: str
    prefix: str
    password: str = field(repr=False)
    also_accept: tuple[str, ...] = field(default=(), repr=False)
    #: SHA-256 digests of passwords still accepted during a rotation (see rotation.py).
    also_accept_hashes: frozenset[str] = field(default=frozenset(), repr=False)
    enabled: bool = True


@dataclass(frozen=True)
class RecoveryReport:
    restarted: bool
    #: Users that did not exist and were created again.
    recreated: tuple[str, ...]
    #: Users that existed but differed from the desired state and were corrected.
    repaired: tuple[str, ...]
    #: The function library tenants FCALL was missing and has been loaded again.
    functions_reloaded: bool = False

    @property
    def changed(self) -> bool:
        return bool(self.recreated or self.repaired or self.functions_reloaded)


def server_run_id(admin: redis.Redis) -> str:
    """The server's run_id: a new one after every restart."""
    return str(admin.info("server")["run_id"])


class UserRecovery:
    """Keeps the run_id seen last; `check()` re-creates missing users. One per shared Redis."""

    def __init__(self, admin: redis.Redis) -> None:
        self.admin = self._admin = admin
        self._run_id: str | None = None
        #: The server's profile (acl.server_profile), learnt on first need and again after a
        #: restart (the restarted server may be another version). Callers may reuse it.
        self.profile: ServerProfile | None = None
        self._profile_lock = threading.Lock()

    def current_profile(self) -> ServerProfile:
        with self._profile_lock:  # handlers of many Organisms ask at once; learn it once
            if self.profile is None:
                self.profile = server_profile(self._admin)
            return self.profile

    def check(self, desired: Iterable[DesiredUser], *, functions: bool = True) -> RecoveryReport:
        """Re-create missing users (all of them after a restart); with `functions`, load the function
        library if it is missing (a replica gets it from its master and refuses FUNCTION LOAD)."""
        wanted = list(desired)
        run_id = server_run_id(self._admin)
        restarted = self._run_id is not None and run_id != self._run_id
        existing = list_users(self._admin)
        todo = wanted if restarted or self._run_id is None else [u for u in wanted if u.username not in existing]
        recreated: list[str] = []
        repaired: list[str] = []
        if restarted:
            self.profile = None
        if todo:
            profile = self.current_profile()
            for u in todo:
                change = ensure_user(self._admin, u.username, u.password, u.prefix, also_accept=u.also_accept,
                                     also_accept_hashes=u.also_accept_hashes, enabled=u.enabled,
                                     profile=profile)
                if change is Change.CREATED:
                    recreated.append(u.username)
                elif change is Change.UPDATED:
                    repaired.append(u.username)
        # Users' pods FCALL the library's functions: a server that lost its users after a restart
        # without persistence lost those too (one FCALL_RO when nothing is missing).
        reloaded = functions and bool(wanted) and ensure_library(self._admin) is LibraryState.LOADED
        # Remember the run_id only once every user is in place: if ensure_user failed half way, the
        # next check sees the restart again and re-applies everything.
        self._run_id = run_id
        return RecoveryReport(restarted=restarted, recreated=tuple(recreated), repaired=tuple(repaired),
                              functions_reloaded=reloaded)
