"""organism.yaml: what an organism is made of, loaded and validated.

    organism:
      name: demo                      # or `organism: demo`; falls back to XP_ORGANISM
      description: Greets people and counts primes.
    backend:                          # BackendConfig.from_dict (XP_* environment overrides it)
      type: manager
    process_pool:
      workers: 2                      # worker processes (local pool, or per `xml-pipeline worker`)
      start_method: spawn             # spawn | forkserver
      max_attempts: 3                 # distributed: a task failing this often goes to dead letters
      claim_idle_seconds: 30          # distributed: reclaim a task whose worker is silent this long
      heartbeat_seconds: 5            # distributed: a running task's worker proves it is alive
      drain_seconds: 30               # SIGTERM: how long in-flight work may take to finish
      task_deadline_seconds: 300      # distributed: a task without a result this long is answered
                                      # with a TaskDeadline error (default: the larger of 300 and
                                      # (max_attempts + 1) × claim_idle_seconds)
    listeners:
      - name: greeter
        handler: "xml_pipeline.examples.greeter:handle"
        description: Says hello.
      - name: primes
        handler: "xml_pipeline.examples.cpu:count_primes"
        cpu_bound: true

Every error is a ConfigError naming the field (`listeners[1].handler`), the file and the YAML line.
"""
from __future__ import annotations

import importlib
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import contract, safe_yaml
from .errors import ConfigError
from .memory.config import BackendConfig

TOP_KEYS: tuple[str, ...] = ("organism", "backend", "process_pool", "listeners")
ORGANISM_KEYS: tuple[str, ...] = ("name", "description")
POOL_KEYS: tuple[str, ...] = ("workers", "start_method", "max_attempts", "claim_idle_seconds",
                              "heartbeat_seconds", "drain_seconds", "task_deadline_seconds")
LISTENER_KEYS: tuple[str, ...] = ("name", "handler", "cpu_bound", "description")
START_METHODS: tuple[str, ...] = ("spawn", "forkserver")
#: No '.': the organism's name is a hop of the registry's root chain ("system.<name>").
# \Z, not $: '$' also matches before a trailing newline, which would let "greeter\n" through.
ORGANISM_NAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?\Z")
LISTENER_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,62}\Z")
HANDLER_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*\Z")
#: Most listeners an organism may have (each is a registry entry and a routing-table row).
MAX_LISTENERS = 1024
#: Upper bound of every process_pool duration (seconds): one day.
MAX_POOL_SECONDS = 86400.0
#: Most worker processes / attempts per task.
MAX_WORKERS = 256
MAX_ATTEMPTS = 100

Handler = Callable[..., Any]


@dataclass(frozen=True)
class ListenerSpec:
    name: str
    handler: str  # "package.module:function"
    cpu_bound: bool = False
    description: str = ""
    #: The imported function (None when loaded with resolve_handlers=False).
    func: Handler | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class ProcessPoolSpec:
    workers: int = field(default_factory=lambda: max(1, min(os.cpu_count() or 1, 8)))
    start_method: str = "spawn"
    max_attempts: int = 3
    claim_idle_seconds: float = 30.0
    heartbeat_seconds: float = 5.0
    drain_seconds: float = 30.0
    #: 0: derived, see `task_deadline`.
    task_deadline_seconds: float = 0.0

    @property
    def task_deadline(self) -> float:
        """Seconds the pump waits for a distributed task's result before it answers TaskDeadline:
        long enough for every attempt to be reclaimed once after a worker died, and for handlers
        of a few minutes (a running task's worker keeps it, but the pump cannot tell a long task
        from a lost one)."""
        return self.task_deadline_seconds or max(300.0, (self.max_attempts + 1) * self.claim_idle_seconds)


@dataclass(frozen=True)
class Organism:
    name: str
    backend: BackendConfig
    listeners: tuple[ListenerSpec, ...]
    process_pool: ProcessPoolSpec = field(default_factory=ProcessPoolSpec)
    description: str = ""
    source: str | None = None

    def listener(self, name: str) -> ListenerSpec | None:
        return next((ls for ls in self.listeners if ls.name == name), None)

    @property
    def listener_names(self) -> tuple[str, ...]:
        return tuple(ls.name for ls in self.listeners)

    @property
    def has_cpu_bound(self) -> bool:
        return any(ls.cpu_bound for ls in self.listeners)


# -- handler references -----------------------------------------------------------------------------
_handler_cache: dict[str, Handler] = {}


def resolve_handler(ref: str) -> Handler:
    """Import "package.module:function" (cached per process). Raises ImportError/AttributeError/TypeError."""
    fn = _handler_cache.get(ref)
    if fn is not None:
        return fn
    module_name, _, attr = ref.partition(":")
    module = importlib.import_module(module_name)
    obj: Any = module
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{ref} is a {type(obj).__name__}, not a function")
    _handler_cache[ref] = obj
    return obj


# -- loading ----------------------------------------------------------------------------------------
class _Lines:
    """Line numbers of every path in a YAML document (from the composed node tree)."""

    def __init__(self, root: yaml.Node | None, source: str | None) -> None:
        self.lines: dict[str, int] = {}
        self.source = source
        if root is not None:
            self._walk(root, "")

    def _walk(self, node: yaml.Node, path: str) -> None:
        self.lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            seen: set[str] = set()
            for key_node, value_node in node.value:
                key = str(key_node.value)
                sub = f"{path}.{key}" if path else key
                if key in seen:
                    raise ConfigError(sub, "duplicate key", line=key_node.start_mark.line + 1,
                                      source=self.source)
                seen.add(key)
                self.lines[sub] = key_node.start_mark.line + 1
                self._walk(value_node, sub)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self._walk(item, f"{path}[{i}]")

    def line(self, path: str) -> int | None:
        while path:
            if path in self.lines:
                return self.lines[path]
            parent = re.sub(r"(\.[^.\[]*|\[\d+\])$", "", path)
            if parent == path:
                break
            path = parent
        return None

    def error(self, path: str, problem: str, allowed: Any = None) -> ConfigError:
        return ConfigError(path, problem, allowed, line=self.line(path), source=self.source)


def load_organism(path: str | os.PathLike[str], *, environ: Mapping[str, str] | None = None,
                  resolve_handlers: bool = True) -> Organism:
    """Load and validate an organism.yaml. The XP_* environment overrides the backend section."""
    p = Path(path)
    text = safe_yaml.read_config_text(p, "organism.yaml")
    return parse_organism(text, source=str(p), environ=environ, resolve_handlers=resolve_handlers)


def parse_organism(text: str, *, source: str | None = None, environ: Mapping[str, str] | None = None,
                   resolve_handlers: bool = True) -> Organism:
    env = os.environ if environ is None else environ
    root, doc = safe_yaml.load(text, source)  # bounded: size, alias expansion, depth, no recursion
    lines = _Lines(root, source)
    if doc is None:
        doc = {}
    if not isinstance(doc, Mapping):
        raise lines.error("organism.yaml", f"must be a mapping with the keys {', '.join(TOP_KEYS)}, "
                          f"got {type(doc).__name__}")
    for key in doc:
        if key not in TOP_KEYS:
            raise lines.error(str(key), "unknown key", TOP_KEYS)

    name, description = _organism_section(doc.get("organism"), lines, env)
    backend = _backend_section(doc.get("backend"), lines, env)
    pool = _pool_section(doc.get("process_pool"), lines)
    listeners = _listeners_section(doc.get("listeners"), lines, resolve_handlers)
    return Organism(name=name, description=description, backend=backend, listeners=listeners,
                    process_pool=pool, source=source)


def _organism_section(value: Any, lines: _Lines, env: Mapping[str, str]) -> tuple[str, str]:
    description = ""
    if value is None:
        name = env.get(contract.ENV_ORGANISM)
        if not name:
            raise lines.error("organism", "missing: give the organism a name (organism: {name: my-organism}) "
                              "or set XP_ORGANISM")
    elif isinstance(value, str):
        name = value
    elif isinstance(value, Mapping):
        for key in value:
            if key not in ORGANISM_KEYS:
                raise lines.error(f"organism.{key}", "unknown key", ORGANISM_KEYS)
        name = value.get("name") or env.get(contract.ENV_ORGANISM) or ""
        description = value.get("description") or ""
        if not isinstance(description, str):
            raise lines.error("organism.description", f"must be a string, got {type(description).__name__}")
    else:
        raise lines.error("organism", f"must be a name or a mapping with name/description, got {type(value).__name__}")
    field_ = "organism.name" if isinstance(value, Mapping) else "organism"
    if not isinstance(name, str) or not ORGANISM_NAME_RE.match(name):
        raise lines.error(field_, f"{name!r} is not a valid organism name",
                          "1-63 letters, digits, '_' or '-', starting and ending with a letter or digit")
    return name, description


def _backend_section(value: Any, lines: _Lines, env: Mapping[str, str]) -> BackendConfig:
    try:
        config = BackendConfig.from_dict(value, source=lines.source)
    except ConfigError as e:
        raise ConfigError(e.field, e.problem, e.allowed, line=lines.line(e.field), source=lines.source) from None
    # The pod contract: XP_* variables override the file (same rules as BackendConfig.from_env).
    return config.with_env_overrides(env)


def _number(value: Any, path: str, lines: _Lines, *, low: float, high: float, integer: bool) -> Any:
    ok = not isinstance(value, bool) and isinstance(value, int if integer else (int, float))
    # not (low <= value <= high) rather than value < low: NaN compares false with everything.
    if not ok or not math.isfinite(value) or not low <= value <= high:
        kind = "an integer" if integer else "a number of seconds"
        raise lines.error(path, f"must be {kind} from {low:g} to {high:g}, got {value!r}", f"{low:g}..{high:g}")
    return value


def _pool_section(value: Any, lines: _Lines) -> ProcessPoolSpec:
    if value is None:
        return ProcessPoolSpec()
    if not isinstance(value, Mapping):
        raise lines.error("process_pool", f"must be a mapping, got {type(value).__name__}", POOL_KEYS)
    kwargs: dict[str, Any] = {}
    for key, v in value.items():
        path = f"process_pool.{key}"
        if key not in POOL_KEYS:
            raise lines.error(path, "unknown key", POOL_KEYS)
        if key == "start_method":
            if v not in START_METHODS:
                raise lines.error(path, f"unknown start method {v!r}", START_METHODS)
            kwargs[key] = v
        elif key in ("workers", "max_attempts"):
            high = MAX_WORKERS if key == "workers" else MAX_ATTEMPTS
            kwargs[key] = _number(v, path, lines, low=1, high=high, integer=True)
        else:
            kwargs[key] = float(_number(v, path, lines, low=0.05, high=MAX_POOL_SECONDS, integer=False))
    spec = ProcessPoolSpec(**kwargs)
    if spec.heartbeat_seconds >= spec.claim_idle_seconds:
        raise lines.error("process_pool.heartbeat_seconds",
                          f"must be shorter than claim_idle_seconds ({spec.claim_idle_seconds:g}), "
                          f"else running tasks are reclaimed from healthy workers")
    return spec


def _listeners_section(value: Any, lines: _Lines, resolve: bool) -> tuple[ListenerSpec, ...]:
    if value is None:
        raise lines.error("listeners", "missing: an organism needs at least one listener "
                          "(- name: greeter, handler: 'package.module:function')")
    if not isinstance(value, list) or not value:
        raise lines.error("listeners", "must be a non-empty list of listeners")
    if len(value) > MAX_LISTENERS:
        raise lines.error("listeners", f"has {len(value)} listeners", f"1..{MAX_LISTENERS}")
    out: list[ListenerSpec] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(value):
        base = f"listeners[{i}]"
        if not isinstance(item, Mapping):
            raise lines.error(base, f"must be a mapping with {', '.join(LISTENER_KEYS)}, got {type(item).__name__}")
        for key in item:
            if key not in LISTENER_KEYS:
                raise lines.error(f"{base}.{key}", "unknown key", LISTENER_KEYS)
        name = item.get("name")
        if name is None:
            raise lines.error(f"{base}.name", "missing")
        if not isinstance(name, str) or not LISTENER_NAME_RE.match(name):
            raise lines.error(f"{base}.name", f"{name!r} is not a valid listener name",
                              "a letter or '_' then up to 62 letters, digits, '_' or '-' (no '.': it separates call-chain hops)")
        if name in seen:
            raise lines.error(f"{base}.name", f"duplicate listener name {name!r} (first used by listeners[{seen[name]}])")
        seen[name] = i
        ref = item.get("handler")
        if ref is None:
            raise lines.error(f"{base}.handler", "missing", "'package.module:function'")
        if not isinstance(ref, str) or not HANDLER_RE.match(ref):
            raise lines.error(f"{base}.handler", f"{ref!r} is not a handler reference", "'package.module:function'")
        cpu_bound = item.get("cpu_bound", False)
        if not isinstance(cpu_bound, bool):
            raise lines.error(f"{base}.cpu_bound", f"must be true or false, got {cpu_bound!r}")
        description = item.get("description") or ""
        if not isinstance(description, str):
            raise lines.error(f"{base}.description", f"must be a string, got {type(description).__name__}")
        func = None
        if resolve:
            try:
                func = resolve_handler(ref)
            except Exception as e:  # ImportError, AttributeError, errors raised while importing
                raise lines.error(f"{base}.handler", f"cannot import {ref!r}: {type(e).__name__}: {e}") from None
        out.append(ListenerSpec(name=name, handler=ref, cpu_bound=cpu_bound, description=description, func=func))
    return tuple(out)
