"""Exceptions of xml-pipeline, in one hierarchy users can catch precisely (like redis-py's).

    XmlPipelineError
    ├── ConfigError (also a ValueError)    bad configuration; names the field and allowed values
    └── BackendError                       anything the shared backend could not do
        ├── BackendUnavailable             the store cannot be reached (Redis down, manager dead)
        │   └── CredentialsRejected        Redis refused the user's password (e.g. after a rotation)
        ├── SlotIntegrityError (also a ValueError)   a stored blob failed its signature check;
        │                                            nothing was unpickled
        ├── AppendIdConflict                         an append id was reused in a thread for a different
        │                                            slot; nothing was stored
        └── ThreadFullError (also a MemoryError)     a thread reached its slot limit; the append
                                                     was not stored

The builtin second bases are what xml-pipeline's original API raised in those cases (ValueError for
a slot that fails its HMAC, MemoryError for a full thread), so code written against it keeps
catching them.
"""
from __future__ import annotations

from collections.abc import Iterable


class XmlPipelineError(Exception):
    """Base class of every error raised by xml-pipeline."""


class ConfigError(XmlPipelineError, ValueError):
    """A configuration value is wrong. `field` is its dotted path; `allowed` describes valid values."""

    def __init__(self, field: str, problem: str, allowed: str | Iterable[str] | None = None,
                 *, line: int | None = None, source: str | None = None) -> None:
        self.field = field
        self.problem = problem
        if allowed is not None and not isinstance(allowed, str):
            allowed = ", ".join(repr(a) for a in allowed)
        self.allowed = allowed
        self.line = line
        self.source = source
        where = field
        if source:
            where = f"{source}" + (f":{line}" if line else "") + f": {field}"
        msg = f"{where}: {problem}"
        if allowed:
            msg += f" (allowed: {allowed})"
        super().__init__(msg)

    def __reduce__(self) -> tuple[object, ...]:
        # Errors cross process boundaries (manager server, worker pools): rebuild from the fields.
        return (_rebuild_config_error, (self.field, self.problem, self.allowed, self.line, self.source))


def _rebuild_config_error(field: str, problem: str, allowed: str | None, line: int | None,
                          source: str | None) -> ConfigError:
    return ConfigError(field, problem, allowed, line=line, source=source)


class BackendError(XmlPipelineError):
    """The shared backend failed to carry out an operation."""


class BackendUnavailable(BackendError):
    """The backend's store cannot be reached. The message names the endpoint, never a password."""


class CredentialsRejected(BackendUnavailable):
    """Redis refused the configured user's password at login (WRONGPASS): a new password is due (a
    rotation), or the configuration is wrong. Nothing was sent."""


class SlotIntegrityError(BackendError, ValueError):
    """A stored blob is not a valid signed envelope (forged, truncated, foreign or signed with an
    unknown key). Raised before anything is unpickled."""


class AppendIdConflict(BackendError):
    """An append carried an append id the thread already recorded for a *different* slot. A repeat
    of an append (a retry) is recognised only when it carries the same slot; this one was not
    stored, and the slot stored under that id is unchanged."""

    def __init__(self, thread_id: str, append_id: str, index: int, detail: str = "holds a different slot") -> None:
        self.thread_id = thread_id
        self.append_id = append_id
        self.index = index
        self.detail = detail
        super().__init__(f"append id {append_id!r} was already used in thread {thread_id!r} for slot {index}, "
                         f"which {detail}: the new slot was not stored (append ids must be unique per thread)")

    def __reduce__(self) -> tuple[object, ...]:
        return (AppendIdConflict, (self.thread_id, self.append_id, self.index, self.detail))


class ThreadFullError(BackendError, MemoryError):
    """The thread already holds its maximum number of slots; the new slot was not stored."""

    def __init__(self, thread_id: str, limit: int) -> None:
        self.thread_id = thread_id
        self.limit = limit
        super().__init__(f"thread {thread_id!r} is full: it already holds {limit} slots "
                         f"(exceeded max slots, max_slots_per_thread={limit})")

    def __reduce__(self) -> tuple[object, ...]:
        return (ThreadFullError, (self.thread_id, self.limit))
