"""Operator settings, read once from the XPO_* environment (the chart sets it) and validated.

A bad value stops the operator at start with a message naming the variable and the allowed values
(exit code 2), instead of surfacing later as a broken Organism.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import metadata
from urllib.parse import urlsplit

from xml_pipeline.errors import ConfigError

DEFAULT_REDIS_IMAGE = "redis:7.2.5-alpine"
IMAGE_REPOSITORY = "ghcr.io/xml-pipeline/xml-pipeline"
TTL_MIN, TTL_MAX = 60, 31_536_000  # one minute .. one year; the CRD enforces the same range
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
#: XPO_POD_USER_IDS: `fixed` (the images' user ids) or `platform` (the platform assigns them).
POD_USER_IDS = ("fixed", "platform")
#: XPO_AUTOSCALER: what an Organism's spec.workers.autoscaling creates.
AUTOSCALERS = ("auto", "keda", "hpa")

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def _version() -> str:
    try:
        return metadata.version("xml-pipeline")
    except metadata.PackageNotFoundError:  # running from a source tree without installing
        return "0.1.0"


def default_image() -> str:
    """The image of this very release: pump and workers run the same code as the operator."""
    return f"{IMAGE_REPOSITORY}:{_version()}"


@dataclass(frozen=True, kw_only=True)
class OperatorSettings:
    """Everything the operator is configured with. Immutable."""

    #: Namespaces to watch; empty tuple = the whole cluster.
    namespaces: tuple[str, ...] = ()
    default_image: str = field(default_factory=default_image)
    default_ttl: int = 86_400
    redis_image: str = DEFAULT_REDIS_IMAGE
    #: Coordinates of the platform's shared Redis (mode shared): one server, or a Redis Cluster or
    #: Sentinel set (topology.py). The URL never carries credentials.
    shared_redis_url: str | None = None
    shared_redis_username: str = "default"
    shared_redis_password: str | None = field(default=None, repr=False)
    #: PEM CA certificate(s) of a rediss:// shared Redis (read from XPO_SHARED_REDIS_CA_FILE at start):
    #: the operator verifies the server with it and hands it to the Organisms' pods and bindings.
    shared_redis_ca: str | None = field(default=None, repr=False)
    health_port: int = 8080
    log_level: str = "INFO"
    #: `fixed`: pods run with the images' user ids; `platform`: the platform assigns them (security.py).
    pod_user_ids: str = "fixed"
    #: PING an Organism's external Redis with its Secret's credentials (see probe.py).
    probe_external_redis: bool = True
    #: Seconds between periodic reconciles of every Organism (repairs drift); 0 disables them.
    resync_seconds: float = 300.0
    #: First retry delay after a transient failure (missing Secret, API error); doubles per retry.
    retry_base_seconds: float = 5.0
    retry_max_seconds: float = 300.0
    #: `auto`: a KEDA ScaledObject where the cluster serves KEDA's API, else an HPA; `keda` / `hpa`: forced.
    autoscaler: str = "auto"
    #: kopf peering (active/standby operators): the peering object's name; None runs standalone.
    peering: str | None = None
    #: Seconds a peer's keep-alive is valid; a standby takes over at most this long after the active died.
    peering_lifetime: int = 60
    #: The client-pod injection webhook (webhook.py): HTTPS port, 0 = off.
    webhook_port: int = 0
    #: The DNS name the API server reaches the webhook by (its Service), for the self-signed certificate.
    webhook_host: str | None = None
    #: A directory with tls.crt and tls.key (cert-manager); unset: a self-signed certificate.
    webhook_cert_dir: str | None = None
    #: The MutatingWebhookConfiguration whose caBundle gets the self-signed certificate's CA.
    webhook_configuration: str | None = None

    @property
    def clusterwide(self) -> bool:
        return not self.namespaces

    def retry_delay(self, retry: int) -> float:
        """Exponential backoff for the n-th retry (0-based), capped."""
        return float(min(self.retry_base_seconds * (2 ** min(retry, 20)), self.retry_max_seconds))

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> "OperatorSettings":
        """Build from XPO_* variables; unset or empty variables keep their defaults."""
        def get(name: str) -> str | None:
            value = environ.get(name, "").strip()
            return value or None

        kwargs: dict[str, object] = {}
        if (raw := get("XPO_NAMESPACES")) is not None:
            names = tuple(dict.fromkeys(n.strip() for n in raw.split(",") if n.strip()))
            for n in names:
                if len(n) > 63 or not _DNS_LABEL.match(n):
                    raise ConfigError("XPO_NAMESPACES", f"{n!r} is not a namespace name",
                                      "comma-separated DNS labels, e.g. 'team-a,team-b'; empty = all namespaces")
            kwargs["namespaces"] = names
        if (raw := get("XPO_DEFAULT_IMAGE")) is not None:
            if any(c.isspace() for c in raw):
                raise ConfigError("XPO_DEFAULT_IMAGE", f"{raw!r} contains whitespace", "an image reference")
            kwargs["default_image"] = raw
        if (raw := get("XPO_REDIS_IMAGE")) is not None:
            if any(c.isspace() for c in raw):
                raise ConfigError("XPO_REDIS_IMAGE", f"{raw!r} contains whitespace", "an image reference")
            kwargs["redis_image"] = raw
        if (raw := get("XPO_DEFAULT_TTL")) is not None:
            kwargs["default_ttl"] = _int("XPO_DEFAULT_TTL", raw, TTL_MIN, TTL_MAX)
        if (raw := get("XPO_SHARED_REDIS_URL")) is not None:
            kwargs["shared_redis_url"] = check_shared_redis_url("XPO_SHARED_REDIS_URL", raw)
        if (raw := get("XPO_SHARED_REDIS_USERNAME")) is not None:
            kwargs["shared_redis_username"] = raw
        if (raw := environ.get("XPO_SHARED_REDIS_PASSWORD")):
            kwargs["shared_redis_password"] = raw  # not stripped: a password is taken verbatim
        if (raw := get("XPO_SHARED_REDIS_CA_FILE")) is not None:
            kwargs["shared_redis_ca"] = read_ca_file("XPO_SHARED_REDIS_CA_FILE", raw,
                                                     str(kwargs.get("shared_redis_url") or ""))
        if (raw := get("XPO_HEALTH_PORT")) is not None:
            kwargs["health_port"] = _int("XPO_HEALTH_PORT", raw, 1, 65535)
        if (raw := get("XPO_LOG_LEVEL")) is not None:
            if raw.upper() not in LOG_LEVELS:
                raise ConfigError("XPO_LOG_LEVEL", f"unknown level {raw!r}", LOG_LEVELS)
            kwargs["log_level"] = raw.upper()
        if (raw := get("XPO_POD_USER_IDS")) is not None:
            if raw not in POD_USER_IDS:
                raise ConfigError("XPO_POD_USER_IDS", f"unknown value {raw!r}", POD_USER_IDS)
            kwargs["pod_user_ids"] = raw
        if (raw := get("XPO_PROBE_EXTERNAL_REDIS")) is not None:
            if raw.lower() not in ("true", "false"):
                raise ConfigError("XPO_PROBE_EXTERNAL_REDIS", f"must be true or false, got {raw!r}", ("true", "false"))
            kwargs["probe_external_redis"] = raw.lower() == "true"
        if (raw := get("XPO_AUTOSCALER")) is not None:
            if raw not in AUTOSCALERS:
                raise ConfigError("XPO_AUTOSCALER", f"unknown value {raw!r}", AUTOSCALERS)
            kwargs["autoscaler"] = raw
        if (raw := get("XPO_PEERING")) is not None:
            if len(raw) > 253 or not _DNS_LABEL.match(raw):
                raise ConfigError("XPO_PEERING", f"{raw!r} is not a peering object name",
                                  "a DNS label, e.g. xml-pipeline-operator; empty = standalone (one replica)")
            kwargs["peering"] = raw
        if (raw := get("XPO_PEERING_LIFETIME")) is not None:
            kwargs["peering_lifetime"] = _int("XPO_PEERING_LIFETIME", raw, 2, 600)
        if (raw := get("XPO_RESYNC_SECONDS")) is not None:
            kwargs["resync_seconds"] = float(_int("XPO_RESYNC_SECONDS", raw, 0, 86_400))
        if (raw := get("XPO_WEBHOOK_PORT")) is not None:
            kwargs["webhook_port"] = _int("XPO_WEBHOOK_PORT", raw, 0, 65535)
        for var, name in (("XPO_WEBHOOK_HOST", "webhook_host"), ("XPO_WEBHOOK_CERT_DIR", "webhook_cert_dir"),
                          ("XPO_WEBHOOK_CONFIGURATION", "webhook_configuration")):
            if (raw := get(var)) is not None:
                if any(c.isspace() for c in raw):
                    raise ConfigError(var, f"{raw!r} contains whitespace", "a DNS name, a path or an object name")
                kwargs[name] = raw
        return cls(**kwargs)  # type: ignore[arg-type]

    @property
    def log_level_number(self) -> int:
        return int(getattr(logging, self.log_level))


def check_redis_url(field_name: str, url: str) -> str:
    """A redis:// or rediss:// URL with a host and no credentials (they travel through Secrets)."""
    allowed = "redis://host[:port][/db] or rediss://host[:port][/db], without user or password"
    try:
        parts = urlsplit(url)
        port = parts.port  # raises on a non-numeric or out-of-range port
    except ValueError:
        raise ConfigError(field_name, "is not a valid URL", allowed) from None
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise ConfigError(field_name, f"must use redis:// or rediss:// and name a host (scheme {parts.scheme!r})",
                          allowed)
    if "@" in parts.netloc:
        # Never echo the URL back: it may contain a password.
        raise ConfigError(field_name, "must not contain credentials", allowed)
    if parts.path not in ("", "/") and not re.fullmatch(r"/[0-9]{1,2}", parts.path):
        raise ConfigError(field_name, f"database path {parts.path!r} is not a number", allowed)
    if parts.query or parts.fragment:
        raise ConfigError(field_name, "must not have a query or fragment", allowed)
    del port
    return url


def check_shared_redis_url(field_name: str, url: str) -> str:
    """The shared Redis: one server (check_redis_url), or a Redis Cluster / Sentinel set by its URL
    (`redis+cluster://h:p,...`, `redis+sentinel://h:p,.../<master>`, `rediss+` for TLS; topology.py).
    The operator administers every node of it (tenancy/nodes.py)."""
    from .topology import SCHEMES, parse_url
    if url.partition("://")[0].lower() in SCHEMES.values():
        parse_url(field_name, url)
        return url
    return check_redis_url(field_name, url)


def read_ca_file(name: str, path: str, url: str) -> str:
    """The PEM text of a CA file for a rediss:// URL (a CA beside a plain URL would be ignored)."""
    allowed = "the path of a readable PEM file with the shared Redis's CA certificate(s), beside a rediss:// URL"
    if not url.startswith("rediss"):  # rediss://, and the rediss+... forms
        raise ConfigError(name, "is set, but XPO_SHARED_REDIS_URL does not use TLS (rediss://)", allowed)
    try:
        with open(path, "rb") as f:
            raw = f.read(4 * 1024 * 1024 + 1)
    except OSError as e:
        raise ConfigError(name, f"{path!r} cannot be read ({e.strerror or e})", allowed) from None
    if len(raw) > 4 * 1024 * 1024:
        raise ConfigError(name, f"{path!r} is larger than 4 MiB", allowed)
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise ConfigError(name, f"{path!r} is not PEM text", allowed) from None
    if "-----BEGIN CERTIFICATE-----" not in text:
        raise ConfigError(name, f"{path!r} holds no PEM certificate", allowed)
    return text


def _int(name: str, raw: str, low: int, high: int) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(name, f"must be an integer, got {raw!r}", f"{low}..{high}") from None
    if not low <= value <= high:
        raise ConfigError(name, f"{value} is out of range", f"{low}..{high}")
    return value
