"""Service Binding: reading an organism's connection from a mounted binding directory.

The operator writes one binding Secret per Organism (`<name>-binding`) in the layout of the Service
Binding specification for Kubernetes (servicebinding.io): one file per key, mounted under
`$SERVICE_BINDING_ROOT/<binding name>/`. Keys:

    type          redis                     (required: what kind of service this is)
    provider      xml-pipeline              (required: who wrote it; other redis bindings are skipped)
    host, port    the Redis server          (used when `url` is absent)
    url           redis[s]://host:port/db   (no credentials; wins over host/port)
    username      the client's ACL user
    password      its password
    prefix        the organism's key prefix (required)
    ttl           seconds; 0 = keys never expire
    signing-key   verifies the slots of the context buffer
    tls           "true" when the server speaks TLS (host/port then mean rediss://)
    ca.crt        PEM CA certificate(s) of a TLS server (else the system trust store verifies it);
                  used in place, as the file BackendConfig.redis_ca_cert names

`BackendConfig.from_binding(path)` reads one directory; `discover()` finds the organism binding under
SERVICE_BINDING_ROOT. Errors name the file (or key) that is wrong and what it should hold.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ConfigError

if TYPE_CHECKING:
    from .memory.config import BackendConfig

#: The environment variable the specification names for the bindings' root directory.
ROOT_ENV = "SERVICE_BINDING_ROOT"
BINDING_TYPE = "redis"
BINDING_PROVIDER = "xml-pipeline"
#: Every key this library reads (a binding may carry others; they are ignored).
KEYS: tuple[str, ...] = ("type", "provider", "host", "port", "url", "username", "password", "prefix", "ttl",
                         "signing-key", "tls")
#: The binding file holding the CA certificate of a TLS server (the specification's name for it).
CA_FILE = "ca.crt"
#: One value file larger than this is not a binding value (a mounted directory of something else).
_MAX_VALUE_BYTES = 64 * 1024


def read_binding(path: str | os.PathLike[str]) -> dict[str, str]:
    """The binding directory's values by key (only the keys in KEYS; trailing newlines stripped)."""
    root = Path(path)
    if not root.is_dir():
        raise ConfigError(str(root), "is not a directory", "a Service Binding directory with one file per key "
                          "(type, provider, host, port, username, password, prefix, ...)")
    values: dict[str, str] = {}
    for key in KEYS:
        f = root / key
        if not f.is_file():
            continue
        try:
            raw = f.read_bytes()
        except OSError as e:
            raise ConfigError(str(f), f"cannot be read: {e.strerror or e}") from None
        if len(raw) > _MAX_VALUE_BYTES:
            raise ConfigError(str(f), f"is {len(raw)} bytes long", f"at most {_MAX_VALUE_BYTES} bytes")
        try:
            values[key] = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError:
            raise ConfigError(str(f), "is not UTF-8 text") from None
    return values


def config_from_values(values: Mapping[str, str], where: str, ca_cert: str | None = None) -> "BackendConfig":
    """A redis BackendConfig from binding values; `where` names the directory in errors. `ca_cert`: the
    path of the binding's ca.crt file, if it has one."""
    from .memory.config import BackendConfig

    def field(key: str) -> str:
        return f"{where}/{key}"

    if values.get("type") != BINDING_TYPE:
        raise ConfigError(field("type"), f"is {values.get('type')!r}", [BINDING_TYPE])
    if values.get("provider") != BINDING_PROVIDER:
        raise ConfigError(field("provider"), f"is {values.get('provider')!r}", [BINDING_PROVIDER])
    tls = values.get("tls", "false").strip().lower()
    if tls not in ("true", "false"):
        raise ConfigError(field("tls"), f"is {values.get('tls')!r}", ["true", "false"])
    url = values.get("url", "").strip()
    if not url:
        host, port = values.get("host", "").strip(), values.get("port", "6379").strip()
        if not host:
            raise ConfigError(field("host"), "is missing (and there is no url)", "the Redis host name")
        if not port.isascii() or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(field("port"), f"is {port!r}", "a TCP port number 1..65535")
        url = f"{'rediss' if tls == 'true' else 'redis'}://{host}:{port}/0"
    if "@" in url.partition("://")[2].partition("/")[0]:
        raise ConfigError(field("url"), "carries credentials", "a URL without user or password (they are in "
                          "the username and password files)")
    prefix = values.get("prefix")
    if not prefix:
        raise ConfigError(field("prefix"), "is missing", "the organism's key prefix, e.g. 'xp:team-a.orders:'")
    ttl_text = values.get("ttl", "").strip()
    ttl: int | None = None
    if ttl_text:
        if not ttl_text.isascii() or not ttl_text.isdigit():
            raise ConfigError(field("ttl"), f"is {ttl_text!r}", "a whole number of seconds (0 = never expire)")
        ttl = int(ttl_text)
    kwargs = {"backend_type": "redis", "redis_url": url, "redis_prefix": prefix, "redis_ttl": ttl,
              "redis_username": values.get("username") or None, "redis_password": values.get("password") or None,
              "signing_key": values.get("signing-key") or None, "redis_ca_cert": ca_cert}
    try:
        return BackendConfig(**kwargs)  # type: ignore[arg-type]
    except ConfigError as e:
        # Name the file that holds the bad value, not the config field.
        files = {"backend.redis_url": "url", "backend.redis_prefix": "prefix", "backend.redis_ttl": "ttl",
                 "backend.signing_key": "signing-key", "backend.redis_ca_cert": CA_FILE}
        raise ConfigError(field(files.get(e.field, e.field)), e.problem, e.allowed) from None


def config_from_binding(path: str | os.PathLike[str]) -> "BackendConfig":
    """BackendConfig.from_binding: one binding directory (its ca.crt, when present, verifies the server)."""
    return config_from_values(read_binding(path), str(Path(path)), ca_file(path))


def ca_file(path: str | os.PathLike[str]) -> str | None:
    """The binding's ca.crt as a path (the file is used where it is mounted: the kubelet keeps it current),
    or None when the binding has none."""
    f = Path(path) / CA_FILE
    return str(f) if f.is_file() else None


def is_organism_binding(path: Path) -> bool:
    """True when `path` is a binding of type redis written by xml-pipeline."""
    try:
        values = read_binding(path)
    except ConfigError:
        return False
    return values.get("type") == BINDING_TYPE and values.get("provider") == BINDING_PROVIDER


def discover(environ: Mapping[str, str] | None = None) -> Path | None:
    """The organism binding under $SERVICE_BINDING_ROOT, or None when the variable is unset or no
    binding there is of type redis by provider xml-pipeline. Two such bindings are ambiguous: an
    error names both (mount one, or pass the path to BackendConfig.from_binding)."""
    env = os.environ if environ is None else environ
    root = env.get(ROOT_ENV)
    if not root:
        return None
    base = Path(root)
    if not base.is_dir():
        raise ConfigError(ROOT_ENV, f"names {root!r}, which is not a directory", "the directory the bindings are "
                          "mounted under")
    found = sorted(p for p in base.iterdir() if not p.name.startswith(".") and p.is_dir() and is_organism_binding(p))
    if len(found) > 1:
        raise ConfigError(ROOT_ENV, f"holds {len(found)} xml-pipeline bindings ({', '.join(p.name for p in found)})",
                          "one binding of type redis by provider xml-pipeline, or BackendConfig.from_binding(path)")
    return found[0] if found else None
