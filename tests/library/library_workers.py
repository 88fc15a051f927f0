"""Code that runs in the child processes of the library tests (spawn and forkserver import it by
name, so it lives in a small module of its own rather than in a test file)."""
from __future__ import annotations

import os
from typing import Any

from xml_pipeline.memory import ContextBuffer, SharedBackend
from xml_pipeline.message_bus.thread_registry import ThreadRegistry


def append_and_claim(backend: SharedBackend, thread_id: str, chain: str, appends: int,
                     barrier: Any, results: Any) -> None:
    """One of N processes: claim `chain` at the same moment as the others, then append `appends`
    slots to `thread_id` as fast as possible. Reports what the backend told this process."""
    try:
        registry = ThreadRegistry(backend)
        buffer = ContextBuffer(backend, max_slots_per_thread=1_000_000)
        barrier.wait(60)
        claimed = registry.get_or_create(chain)
        barrier.wait(60)
        indices = [buffer.append(thread_id, (os.getpid(), i), f"w{os.getpid()}", "sink").index
                   for i in range(appends)]
        results.put(("ok", os.getpid(), claimed, indices, backend.signer.keys))
    except BaseException as e:  # report instead of dying silently
        results.put(("error", os.getpid(), repr(e), [], ()))
    finally:
        backend.close()


def use_inherited(backend: SharedBackend, results: Any) -> None:
    """A forked child using the backend object it inherited."""
    try:
        results.put(("ok", backend.buffer_append("forked", b"from child"), backend.registry_get_uuid("c.parent")))
    except BaseException as e:
        results.put(("error", repr(e), None))


def read_and_append(backend: SharedBackend, thread_id: str, results: Any) -> None:
    """A spawned child with its parent's backend (and, with no key configured, its parent's
    process-local key): read the thread, append one slot."""
    try:
        buffer = ContextBuffer(backend)
        seen = [s.payload for s in buffer.get_thread_slots(thread_id)]
        slot = buffer.append(thread_id, f"from child {os.getpid()}", "child", "parent")
        results.put(("ok", seen, slot.index, backend.signer.local))
    except BaseException as e:
        results.put(("error", repr(e), None, None))
    finally:
        backend.close()
