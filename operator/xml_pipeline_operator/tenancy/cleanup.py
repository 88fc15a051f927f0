"""Delete every key under an organism's prefix: SCAN + UNLINK in batches, resumable.

The finalizer of a deleted Organism calls `cleanup_prefix` with a bounded number of batches per
call and records the `CleanupProgress` after every batch (the operator keeps it in the admin Redis,
under PROGRESS_KEY + prefix, see tenancy.admin), so an operator that dies half way resumes from the
recorded SCAN cursor instead of starting over.

Why resuming from a stale cursor is safe: SCAN guarantees that a key present for the whole scan is
returned at least once, whatever happened between two calls; deleted keys never come back; UNLINK
of a key that is already gone is a no-op. The pass ends when the cursor returns to 0, and a last
verification pass (also resumable) confirms that no key is left, which also catches keys that
appeared while the first pass ran. The operator disables the organism's ACL user (which closes its
connections) before cleaning up, so normally nothing can appear and the second pass finds nothing.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import redis
from xml_pipeline.memory.keys import validate_prefix

DEFAULT_BATCH = 1000


@dataclass(frozen=True)
class CleanupProgress:
    """Where a cleanup stands. JSON-friendly (`as_dict`/`from_dict`) so it can be stored as a string."""

    prefix: str
    cursor: int = 0
    #: Keys UNLINK really removed (a re-run after a crash does not count them twice).
    deleted: int = 0
    #: SCAN calls made so far (over all passes).
    batches: int = 0
    #: Keys removed in the current pass; a pass that removed nothing and wrapped to 0 ends the job.
    pass_deleted: int = 0
    passes: int = 0
    done: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"prefix": self.prefix, "cursor": str(self.cursor), "deleted": self.deleted,
                "batches": self.batches, "passDeleted": self.pass_deleted, "passes": self.passes,
                "done": self.done}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CleanupProgress":
        return cls(prefix=str(data["prefix"]), cursor=int(data.get("cursor", 0)),
                   deleted=int(data.get("deleted", 0)), batches=int(data.get("batches", 0)),
                   pass_deleted=int(data.get("passDeleted", 0)), passes=int(data.get("passes", 0)),
                   done=bool(data.get("done", False)))


def cleanup_prefix(admin: redis.Redis, prefix: str, *, start: CleanupProgress | None = None,
                   batch_size: int = DEFAULT_BATCH, max_batches: int | None = None,
                   on_batch: Callable[[CleanupProgress], None] | None = None,
                   unlink_each: bool = False) -> CleanupProgress:
    """Unlink every key starting with `prefix`; return the progress (``done`` when none is left).

    `start`: progress recorded by an earlier, interrupted call (its prefix must match).
    `max_batches`: bound the work of this call (the operator's finalizer uses it and retries);
    None runs to the end. `on_batch` is called after every batch with the new progress, for the
    caller to persist it (if it raises, the cleanup stops there and the last persisted progress
    stays valid). `unlink_each`: one UNLINK per key (pipelined), for a Redis Cluster node, which
    refuses a multi-key UNLINK whose keys are in different hash slots.
    """
    validate_prefix(prefix, "backend.redis.prefix")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    progress = start if start is not None else CleanupProgress(prefix=prefix)
    if progress.prefix != prefix:
        raise ValueError(f"recorded progress is for prefix {progress.prefix!r}, not {prefix!r}")
    # The prefix holds no glob characters (validated), so MATCH prefix* is exactly its keys.
    pattern = f"{prefix}*"
    done_here = 0
    while not progress.done and (max_batches is None or done_here < max_batches):
        cursor, keys = admin.scan(cursor=progress.cursor, match=pattern, count=batch_size)
        removed = _unlink(admin, keys, unlink_each) if keys else 0
        cursor = int(cursor)
        pass_deleted = progress.pass_deleted + removed
        if cursor == 0:
            # End of a pass: finished when the pass found nothing to delete, otherwise verify again.
            progress = replace(progress, cursor=0, deleted=progress.deleted + removed,
                               batches=progress.batches + 1, pass_deleted=0,
                               passes=progress.passes + 1, done=pass_deleted == 0)
        else:
            progress = replace(progress, cursor=cursor, deleted=progress.deleted + removed,
                               batches=progress.batches + 1, pass_deleted=pass_deleted)
        done_here += 1
        if on_batch is not None:
            on_batch(progress)
    return progress


def _unlink(admin: redis.Redis, keys: list[Any], each: bool) -> int:
    if not each:
        return int(admin.unlink(*keys))
    with admin.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.unlink(key)
        return sum(int(n) for n in pipe.execute())
