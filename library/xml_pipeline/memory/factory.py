"""get_shared_backend: a BackendConfig in, the backend it describes out."""
from __future__ import annotations

import threading
import weakref
from collections.abc import Mapping
from typing import Any

from ..errors import ConfigError
from .config import BackendConfig
from .protocol import SharedBackend


def get_shared_backend(config: BackendConfig | Mapping[str, Any] | None = None) -> SharedBackend:
    """Create the backend `config` describes; the caller owns it (close it, or use `with`).

    Every call creates a new backend, so a config passed here is never ignored (xml-pipeline keeps
    the first one for the life of the process). reset_shared_backend() closes all of them.

    No argument: `BackendConfig.from_env()` (XP_* variables over the organism.yaml named by
    XP_CONFIG; memory when nothing is set). A mapping is read as the `backend:` section of an
    organism.yaml.
    """
    if config is None:
        config = BackendConfig.from_env()
    elif isinstance(config, Mapping):
        config = BackendConfig.from_dict(config)
    elif not isinstance(config, BackendConfig):
        raise ConfigError("config", f"must be a BackendConfig or a mapping, got {type(config).__name__}",
                          "BackendConfig(...), a `backend:` mapping, or None (read the environment)")
    backend = _create(config)
    with _created_lock:
        _created.add(backend)
    return backend


def _create(config: BackendConfig) -> SharedBackend:
    if config.backend_type == "memory":
        from .inmemory import InMemoryBackend
        return InMemoryBackend(config)
    if config.backend_type == "manager":
        from .manager import ManagerBackend
        return ManagerBackend(config)
    from .redis_backend import RedisBackend  # imported here: memory/manager users never load redis-py
    return RedisBackend(config)


_default_lock = threading.Lock()
_default: SharedBackend | None = None
#: Every backend get_shared_backend() made and nobody dropped yet: what reset_shared_backend() closes.
_created: "weakref.WeakSet[SharedBackend]" = weakref.WeakSet()
_created_lock = threading.Lock()


def default_backend() -> SharedBackend:
    """The process-wide backend behind get_context_buffer() / get_registry() without an argument:
    created from the environment on first use, shared by both."""
    global _default
    with _default_lock:
        if _default is None:
            _default = get_shared_backend()
        return _default


def reset_default_backend() -> None:
    """Close and forget the process-wide default backend (tests, or after changing XP_*)."""
    global _default
    with _default_lock:
        backend, _default = _default, None
    if backend is not None:
        backend.close()


def reset_shared_backend() -> None:
    """Close every backend get_shared_backend() created in this process, and the process-wide
    default (tests). The default context buffer and registry are forgotten with it, so the next
    get_context_buffer() / get_registry() start on a fresh default backend."""
    from ..message_bus.thread_registry import reset_registry
    from .context_buffer import forget_context_buffer
    forget_context_buffer()
    reset_registry(clear=False)
    with _created_lock:
        backends = list(_created)
        _created.clear()
    for backend in backends:
        backend.close()
    reset_default_backend()
