"""Typed Organism spec: parsing and validation.

The CRD's schema and CEL rules reject bad specs at the API server, but a spec can still slip past
(the CRD applied without its schema, an older CRD version, `--validate=false` tooling, a bug in a
rule). So everything the schema promises is checked again here, and more (requests above limits,
unknown keys). Every error is a `SpecError` naming the field path and the allowed values; the
handlers turn it into Ready=False with a reason derived from the field (`InvalidBackendRedisTtl`).
"""
from __future__ import annotations

import ipaddress
import json
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Literal, cast
from urllib.parse import urlsplit

import yaml
from xml_pipeline.contract import DEFAULT_PREFIX_SPACE, default_prefix
from xml_pipeline.errors import ConfigError
from xml_pipeline.memory.keys import validate_prefix
from xml_pipeline.organism import parse_organism as parse_library_organism

from .podshape import EMPTY as EMPTY_SHAPE
from .podshape import PodShape, ShapeError
from .podshape import parse as parse_shape
from .scaling import Autoscaling, DisruptionBudget, parse_autoscaling, parse_budget
from .settings import TTL_MAX, TTL_MIN, OperatorSettings, check_redis_url

BackendType = Literal["memory", "manager", "redis"]
RedisMode = Literal["dedicated", "shared", "external"]
BACKEND_TYPES: tuple[str, ...] = ("memory", "manager", "redis")
REDIS_MODES: tuple[str, ...] = ("dedicated", "shared", "external")
DELETION_POLICIES: tuple[str, ...] = ("Delete", "Retain")
MAX_NAME_LEN = 40  # leaves room for "-credentials", "-redis-0" and pod-name hashes within 63
MAX_WORKER_REPLICAS = 100
MAX_PUMP_REPLICAS = 10
MAX_PROCESSES = 64
MAX_CONFIG_BYTES = 512 * 1024  # a ConfigMap holds at most 1 MiB; keep well below
#: Keys of spec.config: organism.yaml minus `backend` (which the operator writes).
CONFIG_KEYS = ("organism", "process_pool", "listeners")

# \Z, not $: '$' also matches before a trailing newline. re.ASCII: \d would take other digits.
_DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?\Z")
_DNS_1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*\Z")
#: A Secret key: not '.', not starting with '..' (the kubelet's rules for keys projected as files).
_SECRET_KEY = re.compile(r"^(\.[-_a-zA-Z0-9][-._a-zA-Z0-9]*|[-_a-zA-Z0-9][-._a-zA-Z0-9]*)\Z")
_QUANTITY = re.compile(r"^(\d+(\.\d*)?|\.\d+)(([KMGTPE]i)|[numkMGTPE]|([eE][+-]?(\d+(\.\d*)?|\.\d+)))?\Z", re.ASCII)
_SIZE = re.compile(r"^(\d+(\.\d+)?)(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?\Z", re.ASCII)
#: An image reference, [registry[:port]/]path[:tag][@sha256:digest] (the CRD's pattern): no
#: whitespace and no shell metacharacters.
_IMAGE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?(:[0-9]{1,5})?(/[a-z0-9]+([._-]+[a-z0-9]+)*)*"
                    r"(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(@sha256:[a-f0-9]{64})?\Z")
#: Upper bounds of quantities (the CRD's CEL rules say the same).
MAX_QUANTITY: dict[str, Decimal] = {"cpu": Decimal(1024), "memory": Decimal(4 * 1024 ** 4)}
MAX_STORAGE = Decimal(64 * 1024 ** 4)
_HOST = re.compile(r"^([a-z0-9]([a-z0-9.-]*[a-z0-9])?|[0-9a-f:.]+)\Z")
#: Hosts an external Redis URL may not name: link-local addresses and cloud instance metadata
#: services (which hand out the node's credentials). Loopback stays allowed: a TLS sidecar on
#: localhost is a legitimate way to reach an external Redis.
_FORBIDDEN_HOSTS = frozenset({"metadata", "metadata.google.internal"})
_FORBIDDEN_NETS = tuple(ipaddress.ip_network(n) for n in (
    "169.254.0.0/16", "100.100.100.200/32", "fe80::/10", "fd00:ec2::254/128"))


class SpecError(ConfigError):
    """A spec value the operator cannot honour. `reason` is a CamelCase condition reason."""

    def __init__(self, field: str, problem: str, allowed: str | tuple[str, ...] | list[str] | None = None,
                 *, reason: str | None = None) -> None:
        super().__init__(field, problem, allowed)
        self.reason = reason or reason_for(field)


def reason_for(field_path: str) -> str:
    """'spec.backend.redis.ttl' -> 'InvalidBackendRedisTtl' (condition reasons are CamelCase)."""
    path = re.sub(r"\[\d+\]", "", field_path)
    parts = [p for p in re.split(r"[._\-\[\]]", path) if p]
    if parts and parts[0] == "spec":
        parts = parts[1:]
    return "Invalid" + "".join(p[:1].upper() + p[1:] for p in parts) if parts else "InvalidSpec"


# --------------------------------------------------------------------------------------------- types
@dataclass(frozen=True)
class Resources:
    """Container resources, as the Kubernetes API spells them (quantities as strings)."""

    requests: dict[str, str] = field(default_factory=dict)
    limits: dict[str, str] = field(default_factory=dict)

    def to_k8s(self) -> dict[str, dict[str, str]]:
        out: dict[str, dict[str, str]] = {}
        if self.requests:
            out["requests"] = dict(self.requests)
        if self.limits:
            out["limits"] = dict(self.limits)
        return out


DEFAULT_APP_RESOURCES = Resources(requests={"cpu": "100m", "memory": "128Mi"}, limits={"memory": "512Mi"})
DEFAULT_REDIS_RESOURCES = Resources(requests={"cpu": "50m", "memory": "64Mi"}, limits={"memory": "256Mi"})


@dataclass(frozen=True)
class SecretKeyRef:
    name: str
    key: str


@dataclass(frozen=True)
class ExternalRedis:
    url: str
    password: SecretKeyRef
    username: SecretKeyRef | None = None
    #: spec.backend.redis.external.caSecretRef: the CA certificate (PEM) the server's certificate is
    #: verified against; None: the system trust store (or a plain redis:// URL).
    ca: SecretKeyRef | None = None


@dataclass(frozen=True)
class Persistence:
    enabled: bool = False
    size: str = "1Gi"
    storage_class: str | None = None


@dataclass(frozen=True)
class RedisSpec:
    mode: RedisMode
    prefix: str
    ttl: int
    external: ExternalRedis | None = None
    resources: Resources = DEFAULT_REDIS_RESOURCES
    persistence: Persistence = Persistence()
    #: Shared mode, on deletion: Delete the organism's keys and ACL user, or Retain the keys (user disabled).
    deletion_policy: str = "Delete"
    #: spec.backend.redis.dedicated.template (podshape.py).
    shape: PodShape = EMPTY_SHAPE


@dataclass(frozen=True)
class WorkersSpec:
    replicas: int
    processes: int
    resources: Resources = DEFAULT_APP_RESOURCES
    shape: PodShape = EMPTY_SHAPE
    #: None: the operator owns the replica count (spec.workers.replicas).
    autoscaling: Autoscaling | None = None
    budget: DisruptionBudget = DisruptionBudget()


@dataclass(frozen=True)
class PumpSpec:
    replicas: int = 1
    shape: PodShape = EMPTY_SHAPE
    budget: DisruptionBudget = DisruptionBudget()


@dataclass(frozen=True)
class Organism:
    """One Organism, validated, with every default resolved."""

    name: str
    namespace: str
    uid: str
    generation: int
    image: str
    #: organism.yaml body without a backend section (the operator writes that one and organism.name).
    config: dict[str, Any]
    backend_type: BackendType
    redis: RedisSpec | None  # None unless backend_type == "redis"
    pump_resources: Resources
    workers: WorkersSpec | None  # None: no worker Deployment
    pump: PumpSpec = PumpSpec()

    @property
    def owner_reference(self) -> dict[str, Any]:
        from . import API_VERSION, KIND
        return {"apiVersion": API_VERSION, "kind": KIND, "name": self.name, "uid": self.uid,
                "controller": True, "blockOwnerDeletion": True}


def reserved_prefix_problem(prefix: str, namespace: str, name: str) -> str | None:
    """Why a prefix written in a shared-mode spec may not be used, or None.

    Default prefixes (`xp:<namespace>.<name>:`) never overlap each other (namespaces and names have
    no dots or colons). A written prefix under `xp:` could be another Organism's default prefix (read
    its retained data, or block its creation) or contain all of them (`xp:`), so it is allowed only
    under the Organism's own default prefix.
    """
    own = default_prefix(namespace, name)
    if not prefix.startswith(DEFAULT_PREFIX_SPACE) or prefix.startswith(own):
        return None
    if own.startswith(prefix):
        return (f"{prefix!r} would contain the default prefixes of other Organisms on the shared Redis "
                f"(every 'xp:<namespace>.<name>:')")
    m = re.match(r"^xp:([a-z0-9-]+)\.([a-z0-9-]+):", prefix)
    whose = f" ({m.group(0)!r} is the default prefix of Organism {m.group(1)}/{m.group(2)})" if m else ""
    return (f"{prefix!r} is in the default-prefix space {DEFAULT_PREFIX_SPACE!r} of the shared Redis, where "
            f"each Organism has 'xp:<namespace>.<name>:'{whose}; another Organism's default prefix is not yours")


# ------------------------------------------------------------------------------------------ parsing
def parse_organism(body: Mapping[str, Any], settings: OperatorSettings) -> Organism:
    """Validate an Organism object (as the API returns it) and resolve its defaults.

    Raises SpecError naming the first offending field.
    """
    meta = body.get("metadata") or {}
    name = meta.get("name")
    if not isinstance(name, str) or len(name) > MAX_NAME_LEN or not _DNS_1035.match(name):
        raise SpecError("metadata.name",
                        f"{name!r} is not a DNS-1035 label of at most {MAX_NAME_LEN} characters "
                        "(it prefixes the names of Services and workloads)",
                        "lowercase letters, digits and '-', starting with a letter, e.g. 'orders'")
    namespace = str(meta.get("namespace") or "default")
    spec = body.get("spec")
    if spec is None:
        spec = {}
    spec = _mapping(spec, "spec")
    _known(spec, "spec", ("image", "config", "backend", "pump", "workers"))

    image = spec.get("image", settings.default_image)
    if not isinstance(image, str) or not image or len(image) > 512 or any(c.isspace() for c in image) or (
            "image" in spec and not _IMAGE.match(image)):
        raise SpecError("spec.image", f"{image!r} is not an image reference",
                        "[registry[:port]/]path[:tag][@sha256:digest], e.g. ghcr.io/xml-pipeline/xml-pipeline:0.1.0 "
                        "(no whitespace or shell metacharacters, at most 512 characters)")

    config = _parse_config(spec.get("config"), name)

    backend = _mapping(spec.get("backend", {}), "spec.backend")
    _known(backend, "spec.backend", ("type", "redis"))
    backend_type = backend.get("type", "redis")
    if backend_type not in BACKEND_TYPES:
        raise SpecError("spec.backend.type", f"unknown backend type {backend_type!r}", BACKEND_TYPES)

    redis: RedisSpec | None = None
    raw_redis = backend.get("redis")
    if backend_type == "redis":
        redis = _parse_redis(_mapping(raw_redis if raw_redis is not None else {}, "spec.backend.redis"),
                             namespace, name, settings)
    elif raw_redis is not None:
        _mapping(raw_redis, "spec.backend.redis")  # kept for a later switch back; must still be a mapping

    pump = _mapping(spec.get("pump", {}), "spec.pump")
    _known(pump, "spec.pump", ("resources", "replicas", "template", "disruptionBudget"))
    pump_resources = _parse_resources(pump.get("resources"), "spec.pump.resources", DEFAULT_APP_RESOURCES)
    pump_replicas = _int(pump.get("replicas", 1), "spec.pump.replicas", 1, MAX_PUMP_REPLICAS)
    if pump_replicas > 1 and backend_type != "redis":
        raise SpecError("spec.pump.replicas", f"more than one pump needs the redis backend (spec.backend.type "
                        f"is {backend_type!r}): pumps share their ingress through a Redis consumer group",
                        "1, or set spec.backend.type: redis")
    pump_spec = PumpSpec(replicas=pump_replicas, shape=_shaped(parse_shape, pump.get("template"), "spec.pump.template", "pump"),
                         budget=_shaped(parse_budget, pump.get("disruptionBudget"), "spec.pump.disruptionBudget"))

    workers: WorkersSpec | None = None
    if "workers" in spec and spec["workers"] is not None:
        if backend_type != "redis":
            raise SpecError("spec.workers",
                            f"worker pods need the redis backend (spec.backend.type is {backend_type!r})",
                            "remove spec.workers, or set spec.backend.type: redis")
        w = _mapping(spec["workers"], "spec.workers")
        _known(w, "spec.workers", ("replicas", "processes", "resources", "template", "autoscaling",
                                   "disruptionBudget"))
        replicas = _int(w.get("replicas", 1), "spec.workers.replicas", 0, MAX_WORKER_REPLICAS)
        pool = config.get("process_pool") or {}
        processes = _int(w.get("processes", pool.get("workers", 1)),
                         "spec.workers.processes" if "processes" in w else "spec.config.process_pool.workers",
                         1, MAX_PROCESSES)
        workers = WorkersSpec(replicas=replicas, processes=processes,
                              resources=_parse_resources(w.get("resources"), "spec.workers.resources",
                                                         DEFAULT_APP_RESOURCES),
                              shape=_shaped(parse_shape, w.get("template"), "spec.workers.template", "worker"),
                              autoscaling=_shaped(parse_autoscaling, w.get("autoscaling"), "spec.workers.autoscaling"),
                              budget=_shaped(parse_budget, w.get("disruptionBudget"), "spec.workers.disruptionBudget"))

    return Organism(
        name=name, namespace=namespace, uid=str(meta.get("uid") or ""),
        generation=int(meta.get("generation") or 0), image=image, config=config,
        backend_type=cast(BackendType, backend_type), redis=redis,
        pump_resources=pump_resources, workers=workers, pump=pump_spec,
    )


def check_prefix_unchanged(org: Organism, recorded: str | None) -> None:
    """Refuse a prefix change: the organism's live keys are under the recorded prefix."""
    if org.redis is None or not recorded or org.redis.prefix == recorded:
        return
    raise SpecError("spec.backend.redis.prefix",
                    f"cannot change from {recorded!r} to {org.redis.prefix!r}: the organism's keys live "
                    "under the recorded prefix (status.redis.prefix)",
                    f"{recorded!r} (revert the change), or create a new Organism for a new prefix",
                    reason="PrefixImmutable")


def _parse_config(raw: Any, name: str) -> dict[str, Any]:
    """spec.config, checked by the library's own organism.yaml validator (the one the pods run), so
    a listener typo is reported on the Organism instead of crash-looping the pods."""
    if raw is None:
        raise SpecError("spec.config", "is required: an organism needs at least one listener",
                        "{listeners: [{name: greeter, handler: 'package.module:function'}]}")
    config = dict(_mapping(raw, "spec.config"))
    if "backend" in config:
        raise SpecError("spec.config.backend", "is not allowed: the operator writes organism.yaml's backend "
                        "section from spec.backend", "move these settings to spec.backend")
    _known(config, "spec.config", CONFIG_KEYS)
    about = config.get("organism")
    if about is not None:
        _known(_mapping(about, "spec.config.organism"), "spec.config.organism", ("description",))
    pool = config.get("process_pool")
    if pool is not None and "workers" in _mapping(pool, "spec.config.process_pool"):
        _int(pool["workers"], "spec.config.process_pool.workers", 1, MAX_PROCESSES)
    try:
        size = len(json.dumps(config))
    except (TypeError, ValueError):
        raise SpecError("spec.config", "is not plain data (JSON-serialisable)", "mappings, lists, "
                        "strings, numbers, booleans") from None
    if size > MAX_CONFIG_BYTES:
        raise SpecError("spec.config", f"is {size} bytes, the maximum is {MAX_CONFIG_BYTES}",
                        "a smaller organism.yaml")
    doc = {"organism": {"name": name, **(about or {})}, **{k: v for k, v in config.items() if k != "organism"}}
    try:
        parse_library_organism(yaml.safe_dump(doc), environ={}, resolve_handlers=False)
    except ConfigError as e:
        raise SpecError(f"spec.config.{e.field}", e.problem, e.allowed) from None
    return config


def _parse_redis(r: Mapping[str, Any], namespace: str, name: str, settings: OperatorSettings) -> RedisSpec:
    path = "spec.backend.redis"
    _known(r, path, ("mode", "prefix", "ttl", "external", "dedicated", "deletionPolicy"))
    mode = r.get("mode", "dedicated")
    deletion_policy = r.get("deletionPolicy", "Delete")
    if deletion_policy not in DELETION_POLICIES:
        raise SpecError(f"{path}.deletionPolicy", f"unknown deletion policy {deletion_policy!r}", DELETION_POLICIES)
    if mode not in REDIS_MODES:
        raise SpecError(f"{path}.mode", f"unknown Redis mode {mode!r}", REDIS_MODES)
    if mode == "shared" and not settings.shared_redis_url:
        raise SpecError(f"{path}.mode", "shared mode needs a shared Redis, but this operator has no "
                        "XPO_SHARED_REDIS_URL (ask the platform team, or use another mode)",
                        ("dedicated", "external"), reason="SharedRedisNotConfigured")

    if "prefix" in r and r["prefix"] is not None:
        prefix, is_default = r["prefix"], False
    else:
        prefix, is_default = default_prefix(namespace, name), True
    try:
        validate_prefix(prefix, f"{path}.prefix")
    except ConfigError as e:
        raise SpecError(e.field, e.problem, e.allowed) from None
    reserved = reserved_prefix_problem(prefix, namespace, name) if mode == "shared" and not is_default else None
    if reserved is not None:
        raise SpecError(f"{path}.prefix", reserved,
                        f"a prefix not starting with {DEFAULT_PREFIX_SPACE!r}, or {default_prefix(namespace, name)!r} "
                        "(this Organism's default: omit the field) or a prefix under it")

    ttl = _int(r.get("ttl", settings.default_ttl), f"{path}.ttl", TTL_MIN, TTL_MAX)

    external: ExternalRedis | None = None
    if mode == "external":
        if "external" not in r or r["external"] is None:
            raise SpecError(f"{path}.external", "is required with mode external",
                            "{url: rediss://host:port, passwordSecretRef: {name: ..., key: ...}}")
        external = _parse_external(_mapping(r["external"], f"{path}.external"))
    elif r.get("external") is not None:
        raise SpecError(f"{path}.external", f"is only allowed with mode external (mode is {mode!r})",
                        "remove it, or set mode: external")

    resources, persistence, shape = DEFAULT_REDIS_RESOURCES, Persistence(), EMPTY_SHAPE
    if r.get("dedicated") is not None:
        if mode != "dedicated":
            raise SpecError(f"{path}.dedicated", f"is only allowed with mode dedicated (mode is {mode!r})",
                            "remove it, or set mode: dedicated")
        d = _mapping(r["dedicated"], f"{path}.dedicated")
        _known(d, f"{path}.dedicated", ("resources", "persistence", "template"))
        resources = _parse_resources(d.get("resources"), f"{path}.dedicated.resources", DEFAULT_REDIS_RESOURCES)
        persistence = _parse_persistence(d.get("persistence"), f"{path}.dedicated.persistence")
        shape = _shaped(parse_shape, d.get("template"), f"{path}.dedicated.template", "redis")
    return RedisSpec(mode=cast(RedisMode, mode), prefix=prefix, ttl=ttl,
                     external=external, resources=resources, persistence=persistence,
                     deletion_policy=deletion_policy, shape=shape)


def _parse_external(e: Mapping[str, Any]) -> ExternalRedis:
    path = "spec.backend.redis.external"
    _known(e, path, ("url", "passwordSecretRef", "usernameSecretRef", "caSecretRef"))
    url = e.get("url")
    if not isinstance(url, str) or not url:
        raise SpecError(f"{path}.url", "is required", "redis://host[:port][/db] or rediss://host[:port][/db]")
    try:
        check_redis_url(f"{path}.url", url)
    except ConfigError as err:
        raise SpecError(err.field, err.problem, err.allowed) from None
    _check_external_host(f"{path}.url", url)
    if e.get("passwordSecretRef") is None:
        raise SpecError(f"{path}.passwordSecretRef", "is required", "{name: <secret>, key: <key, default password>}")
    password = _secret_ref(e["passwordSecretRef"], f"{path}.passwordSecretRef", "password")
    username = None
    if e.get("usernameSecretRef") is not None:
        username = _secret_ref(e["usernameSecretRef"], f"{path}.usernameSecretRef", "username")
    return ExternalRedis(url=url, password=password, username=username, ca=_ca_ref(e.get("caSecretRef"), url))


def _ca_ref(raw: Any, url: str) -> SecretKeyRef | None:
    """spec.backend.redis.external.caSecretRef: {name, key (default ca.crt)}, only beside a TLS URL."""
    path = "spec.backend.redis.external.caSecretRef"
    if raw is None:
        return None
    if not url.startswith("rediss"):
        raise SpecError(path, "is only allowed with a TLS URL (spec.backend.redis.external.url is not rediss://)",
                        "a rediss://host:port URL, or remove caSecretRef")
    return _secret_ref(raw, path, "ca.crt")


def _check_external_host(path: str, url: str) -> None:
    """Refuse URLs that would make the pods (and the operator's probe) talk to a link-local, loopback
    or cloud metadata address. Host names are not resolved here (DNS may change after admission)."""
    parts = urlsplit(url)
    host = (parts.hostname or "").rstrip(".").lower()
    allowed = "a Redis host that is not link-local (169.254.0.0/16, fe80::/10) or a cloud metadata service"
    if not _HOST.match(host) or parts.port == 0:
        raise SpecError(path, "does not name a host and port", "redis[s]://host[:port 1..65535][/db], host a DNS "
                        "name, an IPv4 address or [an IPv6 address]")
    if host in _FORBIDDEN_HOSTS:
        raise SpecError(path, f"names the host {host!r}", allowed)
    try:
        address: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(host)
    except ValueError:
        if not host[:1].isdigit() or not re.fullmatch(r"[0-9a-fx.]+", host):
            return  # a DNS name
        try:  # integer, hex, octal or short forms the resolver still reads as an IPv4 address
            socket.inet_aton(host)
        except OSError:
            return
        raise SpecError(path, f"names the host {host!r}, a non-canonical form of an IPv4 address",
                        "a dotted-quad IPv4 address without leading zeros, e.g. 10.0.0.5, or a host name")
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if any(address in net for net in _FORBIDDEN_NETS if net.version == address.version):
        raise SpecError(path, f"names the address {host!r}, which is link-local or a metadata service",
                        allowed)


def _secret_ref(raw: Any, path: str, default_key: str) -> SecretKeyRef:
    ref = _mapping(raw, path)
    _known(ref, path, ("name", "key"))
    name, key = ref.get("name"), ref.get("key", default_key)
    if not isinstance(name, str) or len(name) > 253 or not _DNS_1123_SUBDOMAIN.match(name):
        raise SpecError(f"{path}.name", f"{name!r} is not a Secret name",
                        "a DNS subdomain: lowercase letters, digits, '-' and '.'")
    if not isinstance(key, str) or len(key) > 253 or not _SECRET_KEY.match(key):
        raise SpecError(f"{path}.key", f"{key!r} is not a Secret key", "letters, digits, '-', '_' and '.'")
    return SecretKeyRef(name=name, key=key)


def _parse_persistence(raw: Any, path: str) -> Persistence:
    if raw is None:
        return Persistence()
    p = _mapping(raw, path)
    _known(p, path, ("enabled", "size", "storageClassName"))
    enabled = p.get("enabled", False)
    if not isinstance(enabled, bool):
        raise SpecError(f"{path}.enabled", f"must be a boolean, got {enabled!r}", ("true", "false"))
    size = p.get("size", "1Gi")
    if not isinstance(size, str) or not _SIZE.match(size) or not 0 < _quantity(size) <= MAX_STORAGE:
        raise SpecError(f"{path}.size", f"{size!r} is not a storage size above 0 and at most 64Ti",
                        "e.g. 1Gi, 500Mi, 10G")
    sc = p.get("storageClassName")
    if sc is not None and (not isinstance(sc, str) or not sc or len(sc) > 253):
        raise SpecError(f"{path}.storageClassName", f"{sc!r} is not a StorageClass name",
                        "a StorageClass name, or omit for the cluster default")
    return Persistence(enabled=enabled, size=size, storage_class=sc)


def _parse_resources(raw: Any, path: str, default: Resources) -> Resources:
    """Explicit resources replace the defaults as a whole (mixing them could put requests above limits)."""
    if raw is None:
        return default
    res = _mapping(raw, path)
    _known(res, path, ("requests", "limits"))
    parsed: dict[str, dict[str, str]] = {}
    for section in ("requests", "limits"):
        values = _mapping(res.get(section) or {}, f"{path}.{section}")
        _known(values, f"{path}.{section}", ("cpu", "memory"))
        out: dict[str, str] = {}
        for key, value in values.items():
            text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
            if not isinstance(text, str) or not _QUANTITY.match(text) or _quantity(text) < 0:
                raise SpecError(f"{path}.{section}.{key}", f"{value!r} is not a quantity",
                                "e.g. 250m or 1 (cpu), 256Mi or 1Gi (memory)")
            if _quantity(text) > MAX_QUANTITY[key]:
                raise SpecError(f"{path}.{section}.{key}", f"{value!r} is above the maximum",
                                "at most 1024 (cpu) or 4Ti (memory)")
            out[key] = text
        parsed[section] = out
    for key, request in parsed["requests"].items():
        limit = parsed["limits"].get(key)
        if limit is not None and _quantity(request) > _quantity(limit):
            raise SpecError(f"{path}.requests.{key}", f"{request} is above the limit {limit}",
                            f"at most limits.{key} ({limit})")
    return Resources(requests=parsed["requests"], limits=parsed["limits"])


def _quantity(text: str) -> Decimal:
    from kubernetes.utils.quantity import parse_quantity
    return cast(Decimal, parse_quantity(text))


# ------------------------------------------------------------------------------------------ helpers
def _shaped(parse: Any, raw: Any, path: str, *args: Any) -> Any:
    """Call a parser of podshape.py / scaling.py, turning its ShapeError into a SpecError."""
    try:
        return parse(raw, path, *args)
    except ShapeError as e:
        raise SpecError(e.field, e.problem, e.allowed) from None


def _mapping(value: Any, path: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise SpecError(path, f"must be a mapping, got {type(value).__name__}", "a mapping of fields")
    return value


def _known(value: Mapping[str, Any], path: str, allowed: tuple[str, ...]) -> None:
    for key in value:
        if key not in allowed:
            raise SpecError(f"{path}.{key}", "is not a known field", allowed)


def _int(value: Any, path: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(path, f"must be an integer, got {value!r}", f"{low}..{high}")
    if not low <= value <= high:
        raise SpecError(path, f"{value} is out of range", f"{low}..{high}")
    return value
