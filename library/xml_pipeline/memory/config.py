"""BackendConfig: which shared backend to use and how to reach it.

Three ways to build one: the constructor, the `backend:` section of an
organism.yaml (`from_yaml` / `from_dict`), and the XP_* environment of a pod (`from_env`, where the
environment overrides the file named by XP_CONFIG). Every value is validated on construction; an
error names the field and the allowed values.
"""
from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path
from typing import Any, Literal, cast
from urllib.parse import urlsplit, urlunsplit


from .. import contract, safe_yaml
from ..errors import ConfigError
from .keys import validate_prefix
from .signing import Signer, parse_keys

BackendType = Literal["memory", "manager", "redis"]
BACKEND_TYPES: tuple[str, ...] = ("memory", "manager", "redis")
#: Every scheme redis_url accepts: one server, a Redis Cluster, a Sentinel set (contract.parse_redis_url).
URL_SCHEMES: tuple[str, ...] = contract.REDIS_URL_SCHEMES

#: organism.yaml `backend:` keys → constructor argument names.
_YAML_KEYS: dict[str, str] = {
    "type": "backend_type",
    "backend_type": "backend_type",
    "redis_url": "redis_url",
    "redis_prefix": "redis_prefix",
    "redis_ttl": "redis_ttl",
    "redis_username": "redis_username",
    "redis_password": "redis_password",
    "redis_ca_cert": "redis_ca_cert",
    "signing_key": "signing_key",
    "manager_address": "manager_address",
    "manager_authkey": "manager_authkey",
    "socket_timeout": "socket_timeout",
    "connect_timeout": "connect_timeout",
    "retries": "retries",
    "health_check_interval": "health_check_interval",
    "max_connections": "max_connections",
    "redis_wait_replicas": "redis_wait_replicas",
}

#: The environment contract (xml_pipeline.contract): exactly these variables are read.
ENV_VARS: Mapping[str, str] = contract.BACKEND_ENV
ENV_CONFIG_PATH = contract.ENV_CONFIG

#: Bounds of the numeric settings: (low, high). A value outside them is a mistake (a retry count
#: of 1e20 retries forever; a pool of 10^8 connections allocates its slots up front).
TIMEOUT_RANGE: tuple[float, float] = (0.001, 3600.0)
INT_RANGES: dict[str, tuple[int, int]] = {
    "retries": (0, 100),
    "health_check_interval": (0, 86400),
    "max_connections": (1, 10_000),
    "redis_wait_replicas": (0, 16),
    # Upstream's BackendConfig limits, accepted for its users (see the fields).
    "max_slots_per_thread": (1, 10_000_000),
    "max_threads": (1, 10_000_000),
}
TTL_MAX = 10 * 365 * 86400
#: Redis database numbers accepted in the URL path (/0 ... /9999).
_DB_PATH = re.compile(r"/?([0-9]{1,4})?\Z", re.ASCII)
_ASCII_INT = re.compile(r"[0-9]{1,12}\Z", re.ASCII)


def redact_url(url: str) -> str:
    """The URL with any password replaced by '***' (for messages and logs)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    if parts.password is None:
        return url
    user = parts.username or ""
    # netloc minus the userinfo: keeps the port text even when it is out of range.
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, f"{user}:***@{host}", parts.path, parts.query, parts.fragment))


@dataclass(frozen=True)
class BackendConfig:
    """Configuration of a shared backend. Immutable; validated on construction.

    The first four fields may be given by position, in xml-pipeline's order; the rest by keyword.
    """

    backend_type: BackendType = "memory"
    redis_url: str = "redis://localhost:6379"
    redis_prefix: str = "xp:"
    #: Seconds every key lives after its thread's last write (sliding). 0 or None: keys never expire.
    redis_ttl: int | None = 86400
    _: KW_ONLY
    redis_username: str | None = None
    redis_password: str | None = field(default=None, repr=False)
    #: Path of a PEM file with the CA certificate(s) a TLS server's certificate is verified against
    #: (instead of the system trust store); unused with a plain redis:// URL. Not secret: a path, in
    #: organism.yaml; the file is checked to exist and hold a certificate.
    redis_ca_cert: str | None = None
    #: HMAC key(s) for slot envelopes: bytes, 'k1,k2' or a list; the first signs, all verify.
    signing_key: str | bytes | Sequence[str | bytes] | None = field(default=None, repr=False)
    #: ManagerBackend: 'host:port' (or a (host, port) tuple), a Unix socket path, or None to start
    #: a private server.
    manager_address: str | None = None
    manager_authkey: str | bytes | None = field(default=None, repr=False)
    socket_timeout: float = 5.0
    connect_timeout: float = 2.0
    retries: int = 3
    health_check_interval: int = 30
    max_connections: int = 64
    #: Opt-in durability on a cluster or a replicated master: after each append (and registry write)
    #: WAIT for this many replicas to acknowledge it. 0: asynchronous
    #: replication, the Redis default (a failover can lose the last acknowledged writes). WAIT waits
    #: at most socket_timeout / 2.
    redis_wait_replicas: int = 0
    #: xml-pipeline's "common limits". Kept so its configs construct; ContextBuffer takes its own
    #: limits (max_slots_per_thread, max_threads), these are not read by any backend.
    max_slots_per_thread: int = 10_000
    max_threads: int = 1_000

    def __post_init__(self) -> None:
        address = self.manager_address
        if isinstance(address, tuple) and len(address) == 2:
            # xml-pipeline's (host, port) form; the text form is what the manager parses.
            object.__setattr__(self, "manager_address", f"{address[0]}:{address[1]}")
        if self.backend_type not in BACKEND_TYPES:
            raise ConfigError("backend.type", f"unknown backend type {self.backend_type!r}", BACKEND_TYPES)
        _check_url(self.redis_url)
        validate_prefix(self.redis_prefix, "backend.redis_prefix")
        ttl = self.redis_ttl
        if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, int) or not 0 <= ttl <= TTL_MAX):
            raise ConfigError("backend.redis_ttl", f"must be a whole number of seconds from 0 to {TTL_MAX}, "
                              f"got {ttl!r}", f"0 (never expire) or a positive integer up to {TTL_MAX}, e.g. 86400")
        low_t, high_t = TIMEOUT_RANGE
        for name in ("socket_timeout", "connect_timeout"):
            v = getattr(self, name)
            # `not low <= v <= high` also refuses NaN (every comparison with NaN is false).
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not low_t <= v <= high_t:
                raise ConfigError(f"backend.{name}", f"must be a finite number of seconds, got {v!r}",
                                  f"{low_t:g}..{high_t:g}")
        for name, (low, high) in INT_RANGES.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
                raise ConfigError(f"backend.{name}", f"must be an integer from {low} to {high}, got {v!r}",
                                  f"{low}..{high}")
        for name in ("redis_username", "redis_password", "manager_address"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, str):
                raise ConfigError(f"backend.{name}", f"must be a string, got {type(v).__name__}")
        _check_ca_cert(self.redis_ca_cert)
        _check_signing_key(self.signing_key)
        # Normalise the key ring once (raises ConfigError on short keys).
        object.__setattr__(self, "_keys", parse_keys(self.signing_key, "backend.signing_key"))

    # -- derived values -------------------------------------------------------------------------
    @property
    def ttl(self) -> int | None:
        """The TTL in seconds, or None when keys never expire."""
        return self.redis_ttl or None

    @property
    def signing_keys(self) -> tuple[bytes, ...]:
        return cast(tuple[bytes, ...], getattr(self, "_keys"))

    def signer(self) -> Signer | None:
        """The configured key ring, or None when no key is configured."""
        return Signer(self.signing_keys) if self.signing_keys else None

    def tls_kwargs(self) -> dict[str, Any]:
        """redis-py connection arguments of the TLS settings: {} without a CA file (the system trust store
        verifies the server) or with a plain URL (no TLS, nothing to verify)."""
        return {"ssl_ca_certs": self.redis_ca_cert} if self.redis_ca_cert and is_tls_url(self.redis_url) else {}

    @property
    def redis_mode(self) -> contract.RedisMode:
        """"standalone", "cluster" or "sentinel": what redis_url names."""
        return contract.redis_mode(self.redis_url)

    @property
    def redacted_url(self) -> str:
        return redact_url(self.redis_url)

    def replace(self, **changes: Any) -> "BackendConfig":
        return dataclasses.replace(self, **changes)

    # -- constructors ---------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, *, source: str | None = None) -> "BackendConfig":
        """Build from the mapping under `backend:` in an organism.yaml."""
        if data is None:
            return cls()
        if not isinstance(data, Mapping):
            raise ConfigError("backend", f"must be a mapping, got {type(data).__name__}", source=source)
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key not in _YAML_KEYS:
                raise ConfigError(f"backend.{key}", "unknown key", sorted(set(_YAML_KEYS) - {"backend_type"}),
                                  source=source)
            kwargs[_YAML_KEYS[key]] = value
        # str.isdigit() would also take '٣٠' (Arabic-Indic digits) for 30: ASCII digits only.
        if "redis_ttl" in kwargs and isinstance(kwargs["redis_ttl"], str) and _ASCII_INT.match(kwargs["redis_ttl"]):
            kwargs["redis_ttl"] = int(kwargs["redis_ttl"])
        try:
            return cls(**kwargs)
        except ConfigError as e:
            if source and not e.source:
                raise ConfigError(e.field, e.problem, e.allowed, source=source) from None
            raise

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str], *, required: bool = True) -> "BackendConfig":
        """Build from the `backend:` section of an organism.yaml file."""
        p = Path(path)
        text = safe_yaml.read_config_text(p, ENV_CONFIG_PATH if required is False else "path")
        _, doc = safe_yaml.load(text, str(p))  # bounded: size, alias expansion, depth, no recursion
        if not isinstance(doc, Mapping) or "backend" not in doc:
            if required:
                raise ConfigError("backend", f"section missing in {str(p)!r}",
                                  "a mapping with type: memory | manager | redis")
            return cls()
        return cls.from_dict(doc["backend"], source=str(p))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "BackendConfig":
        """Build from XP_CONFIG (if set) overridden by the XP_* variables of the contract."""
        env = os.environ if environ is None else environ
        base = cls()
        if env.get(ENV_CONFIG_PATH):
            base = cls.from_yaml(env[ENV_CONFIG_PATH], required=False)
        return base.with_env_overrides(env)

    @classmethod
    def from_binding(cls, path: str | os.PathLike[str]) -> "BackendConfig":
        """Build from a mounted Service Binding directory (one file per key: type, provider, host,
        port, username, password, prefix, ttl, signing-key, ...; xml_pipeline.binding). Errors
        name the file."""
        from ..binding import config_from_binding
        return config_from_binding(path)

    def with_env_overrides(self, environ: Mapping[str, str] | None = None) -> "BackendConfig":
        """This config with the XP_* variables of the contract applied on top (environment wins).

        Errors name the variable, not the field, since that is what the user has to fix.
        """
        env = os.environ if environ is None else environ
        changes: dict[str, Any] = {}
        for var, name in ENV_VARS.items():
            raw = env.get(var)
            if raw is None or raw == "":
                continue
            if name == "redis_ttl":
                # int() also reads '٣٠' (Arabic-Indic digits) and ' 30 ': ASCII digits only.
                if not _ASCII_INT.match(raw):
                    raise ConfigError(var, f"must be a whole number of seconds in ASCII digits, got {raw!r}",
                                      "0 (never expire) or a positive integer, e.g. 86400")
                changes[name] = int(raw)
            else:
                changes[name] = raw
        if not changes:
            return self
        try:
            return dataclasses.replace(self, **changes)
        except ConfigError as e:
            env_var = next((v for v, n in ENV_VARS.items() if e.field.endswith(n.replace("backend_type", "type"))), None)
            raise ConfigError(env_var or e.field, e.problem, e.allowed) from None


def compat_config(config: BackendConfig | str | tuple[Any, ...] | None, backend_type: BackendType,
                  **overrides: Any) -> BackendConfig:
    """The config a backend constructor was given, in either form it accepts.

    `config` is a BackendConfig, None (the defaults of `backend_type`, signing with XP_SIGNING_KEY if
    set), or xml-pipeline's first
    positional argument (a Redis URL, a manager address); the keyword arguments of xml-pipeline's
    constructors arrive in `overrides` as field names, and those not None replace the config's.
    """
    if config is not None and not isinstance(config, BackendConfig):
        field_ = "redis_url" if backend_type == "redis" else "manager_address"
        overrides.setdefault(field_, None)
        if overrides[field_] is not None:
            raise TypeError(f"{field_} given twice: by position ({config!r}) and by keyword")
        overrides[field_] = config
        config = None
    changes = {k: v for k, v in overrides.items() if v is not None}
    if config is None:
        # Built from xml-pipeline's arguments alone: sign with XP_SIGNING_KEY when it is set, the
        # key serialize_slot() uses by default, so both agree without any other configuration.
        env_key = os.environ.get(contract.ENV_SIGNING_KEY) or None
        if env_key is not None:
            changes.setdefault("signing_key", env_key)
        return BackendConfig(backend_type=backend_type, **changes)
    return dataclasses.replace(config, **changes) if changes else config


def _check_url(url: object) -> None:
    field_ = "backend.redis_url"
    allowed = contract.REDIS_URL_FORMS
    if not isinstance(url, str) or not url:
        raise ConfigError(field_, f"must be a non-empty string, got {url!r}", allowed)
    if contract.redis_mode(url) != "standalone":
        # Cluster and sentinel URLs: a node list (and a master name), parsed by the contract.
        contract.parse_redis_url(url, field_)
        return
    try:
        parts = urlsplit(url)
        port = parts.port  # raises ValueError for a bad port
    except ValueError as e:
        raise ConfigError(field_, f"{redact_url(url)!r} is malformed ({e})", allowed) from None
    if parts.scheme not in contract.STANDALONE_SCHEMES:
        raise ConfigError(field_, f"{redact_url(url)!r} has scheme {parts.scheme!r}", allowed)
    if parts.scheme == "unix":
        if not parts.path:
            raise ConfigError(field_, f"{url!r} names no socket path", allowed)
    elif not parts.hostname:
        raise ConfigError(field_, f"{redact_url(url)!r} names no host", allowed)
    del port
    # redis-py reads options from the query string (socket_timeout=abc fails deep inside it, NaN
    # passes, and they override the validated settings): the settings belong in backend.* instead.
    if parts.query:
        raise ConfigError(field_, f"{redact_url(url)!r} has query parameters ({parts.query.split('=')[0]!r})",
                          "no '?...': set backend.socket_timeout, connect_timeout, max_connections, ... instead")
    # redis-py silently uses db 0 for a path it cannot read as a number (redis://host/abc).
    if parts.scheme != "unix" and not _DB_PATH.match(parts.path):
        raise ConfigError(field_, f"{redact_url(url)!r} has the path {parts.path!r}, not a database number",
                          "redis://host[:port] or redis://host[:port]/N with N a database number 0..9999")


#: What a PEM CA file starts a certificate with (a key file or a DER file is a mistake worth naming).
_PEM_CERTIFICATE = b"-----BEGIN CERTIFICATE-----"
#: Larger than any CA bundle (the Mozilla bundle is ~220 KB): something else was named.
_CA_MAX_BYTES = 4 * 1024 * 1024


def is_tls_url(url: str) -> bool:
    """True for the URL schemes that speak TLS (rediss://, and rediss+... forms)."""
    return url.partition("://")[0].startswith("rediss")


def _check_ca_cert(path: object) -> None:
    """backend.redis_ca_cert: a readable PEM file with at least one certificate. Not tied to the URL's
    scheme here: organism.yaml may name the CA while XP_REDIS_URL brings the rediss:// URL (layers are
    validated one by one); beside a plain URL it is not used (tls_kwargs)."""
    field_ = "backend.redis_ca_cert"
    allowed = "the path of a readable PEM file holding the CA certificate(s) of a rediss:// server"
    if path is None:
        return
    if not isinstance(path, str) or not path:
        raise ConfigError(field_, f"must be a non-empty string (a file path), got {path!r}", allowed)
    p = Path(path)
    try:
        with p.open("rb") as f:
            head = f.read(_CA_MAX_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(field_, f"{path!r} does not exist", allowed) from None
    except IsADirectoryError:
        raise ConfigError(field_, f"{path!r} is a directory", allowed) from None
    except OSError as e:
        raise ConfigError(field_, f"{path!r} cannot be read ({e.strerror or e})", allowed) from None
    if len(head) > _CA_MAX_BYTES:
        raise ConfigError(field_, f"{path!r} is larger than {_CA_MAX_BYTES} bytes", allowed)
    if _PEM_CERTIFICATE not in head:
        raise ConfigError(field_, f"{path!r} holds no PEM certificate (no {_PEM_CERTIFICATE.decode()!r} line)",
                          allowed)


def _check_signing_key(value: object) -> None:
    """The shapes a signing key may have; anything else (an integer, a list of integers, commas
    only) would be a missing or meaningless key accepted silently."""
    field_ = "backend.signing_key"
    allowed = "a string of 16 or more characters, several comma-separated for rotation, or a list of such strings"
    if value is None:
        return
    items: list[object]
    if isinstance(value, (str, bytes)):
        sep: Any = "," if isinstance(value, str) else b","
        items = list(value.split(sep))
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise ConfigError(field_, f"must be a string, got {type(value).__name__}", allowed)
    if not items or items == [""] or items == [b""]:
        raise ConfigError(field_, "is empty", allowed)
    for i, item in enumerate(items):
        if not isinstance(item, (str, bytes)):
            raise ConfigError(field_, f"key {i + 1} must be a string, got {type(item).__name__}", allowed)
        if not item.strip():
            raise ConfigError(field_, f"key {i + 1} of {len(items)} is empty (stray comma?)", allowed)
