"""get_shared_backend (the process-wide backend) and create_backend (one the caller owns)."""
from __future__ import annotations

import threading
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .config import BackendConfig
from .protocol import SharedBackend


def get_shared_backend(config: BackendConfig | Mapping[str, Any] | None = None) -> SharedBackend:
    """The process-wide shared backend, created on first use (the caller shares it: don't close it
    unless you mean every user of it to stop).

    Code that calls get_shared_backend() in two places gets one backend, so a ContextBuffer and a
    ThreadRegistry built from it see the same state. A config passed here is never ignored: when
    it differs from the current backend's config (or that backend was closed), a new backend is
    created from it and becomes the process-wide one; the previous one stays open for whoever holds
    it. reset_shared_backend() closes all of them.

    No argument: the current backend, or `BackendConfig.from_env()` (XP_* variables over the
    organism.yaml named by XP_CONFIG), or, when none of those is set, the organism's Service Binding
    under SERVICE_BINDING_ROOT (`default_config`); memory when there is none either. A mapping is read as the
    `backend:` section of an organism.yaml. For a backend of your own to close, use create_backend().
    """
    global _default
    wanted = None if config is None else _as_config(config)
    with _default_lock:
        current = _default
        if current is not None and not current.closed and (wanted is None or wanted == current.config):
            return current
        _default = create_backend(wanted if wanted is not None else default_config())
        return _default


def configuring_binding(environ: Mapping[str, str] | None = None) -> Path | None:
    """The binding directory default_config() reads the whole configuration from: the xml-pipeline
    binding under SERVICE_BINDING_ROOT when no XP_* variable (nor XP_CONFIG) is set, else None."""
    import os

    from ..binding import discover
    from .config import ENV_CONFIG_PATH, ENV_VARS
    env = os.environ if environ is None else environ
    if any(env.get(v) for v in (*ENV_VARS, ENV_CONFIG_PATH)):
        return None
    return discover(env)


def default_config(environ: Mapping[str, str] | None = None) -> BackendConfig:
    """The config of a process that was given none: the XP_* environment (and XP_CONFIG) when any of
    it is set, else the xml-pipeline binding under SERVICE_BINDING_ROOT, else the defaults (memory).
    A TLS URL from the environment without a CA file takes the binding's ca.crt when one is mounted."""
    import os

    from ..binding import ca_file, discover
    from .config import is_tls_url
    env = os.environ if environ is None else environ
    found = configuring_binding(env)
    if found is not None:
        return BackendConfig.from_binding(found)
    config = BackendConfig.from_env(env)
    if config.backend_type == "redis" and config.redis_ca_cert is None and is_tls_url(config.redis_url):
        # No XP_* variable names a CA file: a pod configured by environment (the injection webhook's env
        # mode) gets the CA of a TLS server from the organism binding mounted beside it.
        found = discover(env)
        ca = ca_file(found) if found is not None else None
        if ca is not None:
            config = config.replace(redis_ca_cert=ca)
    return config


def create_backend(config: BackendConfig | Mapping[str, Any] | None = None) -> SharedBackend:
    """A new backend for `config` that the caller owns (close it, or use `with`). Arguments as for
    get_shared_backend()."""
    backend = _create(default_config() if config is None else _as_config(config))
    with _created_lock:
        _created.add(backend)
    return backend


def _as_config(config: BackendConfig | Mapping[str, Any]) -> BackendConfig:
    if isinstance(config, BackendConfig):
        return config
    if isinstance(config, Mapping):
        return BackendConfig.from_dict(config)
    raise ConfigError("config", f"must be a BackendConfig or a mapping, got {type(config).__name__}",
                      "BackendConfig(...), a `backend:` mapping, or None (read the environment)")


def _create(config: BackendConfig) -> SharedBackend:
    if config.backend_type == "memory":
        from .inmemory import InMemoryBackend
        return InMemoryBackend(config)
    if config.backend_type == "manager":
        from .manager import ManagerBackend
        return ManagerBackend(config)
    from .redis_backend import RedisBackend  # imported here: memory/manager users never load redis-py
    return RedisBackend(config)


_default_lock = threading.RLock()
_default: SharedBackend | None = None
#: Every backend create_backend() made and nobody dropped yet: what reset_shared_backend() closes.
_created: "weakref.WeakSet[SharedBackend]" = weakref.WeakSet()
_created_lock = threading.Lock()


def default_backend() -> SharedBackend:
    """The process-wide backend behind get_context_buffer() / get_registry() without an argument:
    the one get_shared_backend() returns, shared by both."""
    return get_shared_backend()


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
