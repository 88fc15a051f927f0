"""xml_pipeline.memory: the shared backend (memory | manager | redis), the Context Buffer and slots.

    from xml_pipeline.memory import get_shared_backend, BackendConfig
    backend = get_shared_backend(BackendConfig(backend_type="manager"))

RedisBackend is imported on first use, so processes on memory or manager never load redis-py.
xml-pipeline's module paths work as well: memory.shared_backend, memory.memory_backend,
memory.manager_backend, memory.redis_backend, memory.context_buffer (docs/migrating.md).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import (
    BackendError,
    BackendUnavailable,
    ConfigError,
    SlotIntegrityError,
    ThreadFullError,
    XmlPipelineError,
)
from .config import BackendConfig
from .context_buffer import ContextBuffer, get_context_buffer, reset_context_buffer
from .factory import create_backend, get_shared_backend, reset_shared_backend
from .handler_metadata import HandlerMetadata, slot_to_handler_metadata
from .inmemory import InMemoryBackend
from .manager import ManagerBackend
from .protocol import SharedBackend
from .serialization import deserialize_slot, serialize_slot
from .slots import BufferSlot, SlotMetadata
from .thread_context import ThreadContext

if TYPE_CHECKING:
    from .redis_backend import RedisBackend

__all__ = [
    "SharedBackend",
    "InMemoryBackend",
    "ManagerBackend",
    "RedisBackend",
    "BackendConfig",
    "get_shared_backend",
    "create_backend",
    "reset_shared_backend",
    "serialize_slot",
    "deserialize_slot",
    "get_context_buffer",
    "reset_context_buffer",
    "ContextBuffer",
    "ThreadContext",
    "BufferSlot",
    "SlotMetadata",
    "HandlerMetadata",
    "slot_to_handler_metadata",
    "XmlPipelineError",
    "ConfigError",
    "BackendError",
    "BackendUnavailable",
    "SlotIntegrityError",
    "ThreadFullError",
]


def __getattr__(name: str) -> Any:
    if name == "RedisBackend":
        from .redis_backend import RedisBackend
        globals()["RedisBackend"] = RedisBackend
        return RedisBackend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | {"RedisBackend"})
