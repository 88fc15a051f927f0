"""Organism users on every node of the shared Redis, and what that did per node.

ACL users are per node (nodes.py), so each step the admin takes on a user — create or correct it,
disable it, delete it — is taken on every node, and the outcome is kept per node (`Spread`): a node
where the user had to be *created* while the others already had it is a node that lost it (restarted
without an ACL file, replaced, or edited by hand) and was repaired; the Organism's condition names it.

The decisions are pure functions over per-node facts (`overall`, `repaired`, `still_accepted`,
`progress_done`); the loops that gather the facts and apply them are thin.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import redis

from . import acl, client_acl
from .acl import Change
from .cleanup import CleanupProgress, cleanup_prefix
from .functions import LibraryState, ensure_library
from .nodes import Node
from .nodeset import NodeFailure, NodeSet
from .recovery import DesiredUser, RecoveryReport, UserRecovery


@dataclass(frozen=True)
class Spread:
    """One step's outcome on every node: the change per node address, and unreachable nodes."""

    changes: Mapping[str, Change] = field(default_factory=dict)
    failures: tuple[NodeFailure, ...] = ()

    @property
    def complete(self) -> bool:
        return not self.failures

    def overall(self) -> Change:
        return overall(self.changes)

    def repaired(self) -> tuple[str, ...]:
        return repaired(self.changes)

    def failure_text(self) -> str:
        return "; ".join(f"{f.node} ({f.error})" for f in self.failures)


def overall(changes: Mapping[str, Change]) -> Change:
    """CREATED when every node created the user, UPDATED when any node changed, else UNCHANGED."""
    values = set(changes.values())
    if values == {Change.CREATED}:
        return Change.CREATED
    return Change.UPDATED if values & {Change.CREATED, Change.UPDATED} else Change.UNCHANGED


def repaired(changes: Mapping[str, Change]) -> tuple[str, ...]:
    """Nodes that had to create a user the other nodes already had: they had lost it."""
    if Change.CREATED not in changes.values() or set(changes.values()) == {Change.CREATED}:
        return ()
    return tuple(sorted(a for a, c in changes.items() if c is Change.CREATED))


def still_accepted(users: Mapping[str, acl.AclUser | None], password: str, extra: frozenset[str]) -> frozenset[str]:
    """Digests a user accepts on nodes where it does not know `password` (the Secret's password was
    changed by hand): recorded before anything is removed, so no running pod is locked out (pure)."""
    digest = acl.password_hash(password)
    out: set[str] = set()
    for user in users.values():
        if user is not None and digest not in user.password_hashes:
            out |= user.password_hashes - extra - {digest}
    return frozenset(out)


class NodeAdmin:
    """Per-node state the admin keeps: each node's recovery (run_id, server profile) and its wording
    of the client users' rules. One per NodeSet."""

    def __init__(self, nodeset: NodeSet) -> None:
        self.nodeset = nodeset
        self._recoveries: dict[str, UserRecovery] = {}
        self._client_words: dict[str, tuple[frozenset[str], frozenset[str]]] = {}

    def recovery(self, node: Node, client: redis.Redis) -> UserRecovery:
        r = self._recoveries.get(node.address)
        if r is None or r.admin is not client:
            r = self._recoveries[node.address] = UserRecovery(client)
        return r

    # -- users -------------------------------------------------------------------------------------
    def users(self, username: str) -> dict[str, acl.AclUser | None]:
        users, _ = self.nodeset.each(lambda node, client: acl.get_user(client, username))
        return users

    def ensure_user(self, username: str, password: str, prefix: str, extra: frozenset[str]) -> Spread:
        def step(node: Node, client: redis.Redis) -> Change:
            profile = self.recovery(node, client).current_profile()
            return acl.ensure_user(client, username, password, prefix, also_accept_hashes=extra, profile=profile)
        return self._spread(step)

    def ensure_client(self, username: str, password: str, prefix: str, extra: frozenset[str]) -> Spread:
        def step(node: Node, client: redis.Redis) -> Change:
            available = self.recovery(node, client).current_profile().available
            cached = self._client_words.get(node.address)
            if cached is None or cached[0] != available:
                cached = self._client_words[node.address] = (available,
                                                             client_acl.described_commands(client, available))
            return client_acl.ensure_client_user(client, username, password, prefix, also_accept_hashes=extra,
                                                 available=available, described=cached[1])
        return self._spread(step)

    def disable(self, username: str) -> Spread:
        return self._spread(lambda node, client: Change.UPDATED if acl.disable_user(client, username)
                            else Change.UNCHANGED)

    def delete(self, username: str) -> Spread:
        return self._spread(lambda node, client: Change.UPDATED if acl.delete_user(client, username)
                            else Change.UNCHANGED)

    def exists_anywhere(self, username: str) -> bool:
        found, _ = self.nodeset.each(lambda node, client: acl.user_exists(client, username))
        return any(found.values())

    def save(self) -> None:
        """ACL SAVE on every node that has an ACL file (best effort, like the one-server case)."""
        def step(node: Node, client: redis.Redis) -> bool:
            try:
                return acl.save_acl(client)
            except redis.RedisError:
                return False
        self.nodeset.each(step)

    def _spread(self, step: Callable[[Node, redis.Redis], Change]) -> Spread:
        changes, failures = self.nodeset.each(step)
        return Spread(changes, tuple(failures))

    # -- functions and recovery --------------------------------------------------------------------
    def ensure_library(self) -> dict[str, LibraryState]:
        """The function library on every master (replicas get it by replication; they refuse loads)."""
        states, failures = self.nodeset.each(lambda node, client: ensure_library(client), self.nodeset.masters())
        if failures:
            raise redis.ConnectionError("master(s) unreachable: " + "; ".join(f.node for f in failures))
        return states

    def check(self, desired: list[DesiredUser]) -> tuple[dict[str, RecoveryReport], list[NodeFailure]]:
        """The lost-user check on every node (recovery.py), the function library on the masters."""
        def step(node: Node, client: redis.Redis) -> RecoveryReport:
            return self.recovery(node, client).check(desired, functions=node.role == "master")
        return self.nodeset.each(step, self.nodeset.nodes(refresh=True))


# -- cleanup on every master ----------------------------------------------------------------------------
def progress_from_json(raw: str | bytes | None, prefix: str) -> dict[str, CleanupProgress]:
    """The recorded per-master progress (`{"nodes": {address: progress}}`), empty when none."""
    if not raw:
        return {}
    data = json.loads(raw)
    nodes: Mapping[str, Any] = data.get("nodes") or {}
    return {a: CleanupProgress.from_dict(p) for a, p in nodes.items() if p.get("prefix") == prefix}


def progress_to_json(progress: Mapping[str, CleanupProgress]) -> str:
    return json.dumps({"nodes": {a: p.as_dict() for a, p in sorted(progress.items())}})


def progress_done(progress: Mapping[str, CleanupProgress], masters: Iterable[str]) -> bool:
    """Every current master finished (a master that is new since the last call starts from 0)."""
    return all(a in progress and progress[a].done for a in masters)


def cleanup_masters(nodeset: NodeSet, prefix: str, start: Mapping[str, CleanupProgress], *, batch_size: int,
                    keep_going: Callable[[], bool], persist: Callable[[dict[str, CleanupProgress]], None]
                    ) -> dict[str, CleanupProgress]:
    """SCAN + UNLINK the prefix on every master, one batch at a time, round-robin, while
    `keep_going()`; `persist` records the progress after each batch. Keys are unlinked one command
    each (a cluster refuses a multi-key UNLINK across slots)."""
    masters = nodeset.masters()
    progress = {a: p for a, p in start.items() if a in {m.address for m in masters}}
    first = True
    while not progress_done(progress, [m.address for m in masters]) and (first or keep_going()):
        first = False
        for node in masters:
            current = progress.get(node.address) or CleanupProgress(prefix=prefix)
            if current.done:
                continue
            progress[node.address] = cleanup_prefix(nodeset.client(node), prefix, start=current,
                                                    batch_size=batch_size, max_batches=1, unlink_each=True)
            persist(dict(progress))
    return progress


def deleted(progress: Mapping[str, CleanupProgress]) -> int:
    return sum(p.deleted for p in progress.values())

