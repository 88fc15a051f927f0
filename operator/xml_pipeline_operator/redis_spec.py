"""spec.backend.redis: the mode (dedicated, shared, external), prefix, TTL and the external topology.

An external Redis is one server (`external.mode: standalone`, by URL), a Redis Cluster (`cluster`,
by seed addresses) or a Sentinel set (`sentinel`, by the sentinels' addresses and the master's name);
the pods get it as one XP_REDIS_URL (topology.format_url). The dedicated Redis the operator runs is
always one server.
"""
from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, cast
from urllib.parse import urlsplit

from xml_pipeline.contract import DEFAULT_PREFIX_SPACE, default_prefix
from xml_pipeline.errors import ConfigError
from xml_pipeline.memory.keys import validate_prefix

from . import topology
from .podshape import EMPTY as EMPTY_SHAPE
from .podshape import PodShape
from .podshape import parse as parse_shape
from .settings import TTL_MAX, TTL_MIN, OperatorSettings, check_redis_url
from .spec_fields import (
    DEFAULT_REDIS_RESOURCES,
    MAX_STORAGE,
    SIZE,
    Resources,
    SpecError,
    integer,
    known,
    mapping,
    parse_resources,
    quantity,
    shaped,
)

RedisMode = Literal["dedicated", "shared", "external"]
REDIS_MODES: tuple[str, ...] = ("dedicated", "shared", "external")
#: spec.backend.redis.external.mode: what the external Redis is.
EXTERNAL_MODES: tuple[str, ...] = topology.MODES
DELETION_POLICIES: tuple[str, ...] = ("Delete", "Retain")

_DNS_1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*\Z")
#: A Secret key: not '.', not starting with '..' (the kubelet's rules for keys projected as files).
_SECRET_KEY = re.compile(r"^(\.[-_a-zA-Z0-9][-._a-zA-Z0-9]*|[-_a-zA-Z0-9][-._a-zA-Z0-9]*)\Z")
_HOST = re.compile(r"^([a-z0-9]([a-z0-9.-]*[a-z0-9])?|[0-9a-f:.]+)\Z")
#: Hosts an external Redis may not name: link-local addresses and cloud instance metadata services
#: (which hand out the node's credentials). Loopback stays allowed: a TLS sidecar on localhost is a
#: legitimate way to reach an external Redis.
_FORBIDDEN_HOSTS = frozenset({"metadata", "metadata.google.internal"})
_FORBIDDEN_NETS = tuple(ipaddress.ip_network(n) for n in (
    "169.254.0.0/16", "100.100.100.200/32", "fe80::/10", "fd00:ec2::254/128"))


@dataclass(frozen=True)
class SecretKeyRef:
    name: str
    key: str


@dataclass(frozen=True)
class ExternalRedis:
    #: What the pods get as XP_REDIS_URL: the written URL (standalone), or the cluster / sentinel URL
    #: built from `addresses`, `master_name` and `tls` (never with credentials).
    url: str
    password: SecretKeyRef
    username: SecretKeyRef | None = None
    mode: topology.Mode = "standalone"
    #: Seeds of a cluster, or the sentinels; empty in standalone mode.
    addresses: tuple[topology.Address, ...] = ()
    master_name: str | None = None
    tls: bool = False
    #: spec.backend.redis.external.caSecretRef: the CA certificate (PEM) the server's certificate is
    #: verified against; None: the system trust store (or no TLS).
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


def parse_redis(r: Mapping[str, Any], namespace: str, name: str, settings: OperatorSettings) -> RedisSpec:
    path = "spec.backend.redis"
    known(r, path, ("mode", "prefix", "ttl", "external", "dedicated", "deletionPolicy"))
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

    ttl = integer(r.get("ttl", settings.default_ttl), f"{path}.ttl", TTL_MIN, TTL_MAX)

    external: ExternalRedis | None = None
    if mode == "external":
        if "external" not in r or r["external"] is None:
            raise SpecError(f"{path}.external", "is required with mode external",
                            "{url: rediss://host:port, passwordSecretRef: {name: ..., key: ...}}, or "
                            "{mode: cluster, addresses: [host:port, ...], passwordSecretRef: ...}")
        external = parse_external(mapping(r["external"], f"{path}.external"))
    elif r.get("external") is not None:
        raise SpecError(f"{path}.external", f"is only allowed with mode external (mode is {mode!r})",
                        "remove it, or set mode: external")

    resources, persistence, shape = DEFAULT_REDIS_RESOURCES, Persistence(), EMPTY_SHAPE
    if r.get("dedicated") is not None:
        if mode != "dedicated":
            raise SpecError(f"{path}.dedicated", f"is only allowed with mode dedicated (mode is {mode!r})",
                            "remove it, or set mode: dedicated")
        d = mapping(r["dedicated"], f"{path}.dedicated")
        known(d, f"{path}.dedicated", ("resources", "persistence", "template"))
        resources = parse_resources(d.get("resources"), f"{path}.dedicated.resources", DEFAULT_REDIS_RESOURCES)
        persistence = _parse_persistence(d.get("persistence"), f"{path}.dedicated.persistence")
        shape = shaped(parse_shape, d.get("template"), f"{path}.dedicated.template", "redis")
    return RedisSpec(mode=cast(RedisMode, mode), prefix=prefix, ttl=ttl,
                     external=external, resources=resources, persistence=persistence,
                     deletion_policy=deletion_policy, shape=shape)


def parse_external(e: Mapping[str, Any]) -> ExternalRedis:
    path = "spec.backend.redis.external"
    known(e, path, ("mode", "url", "addresses", "masterName", "tls", "passwordSecretRef", "usernameSecretRef",
                    "caSecretRef"))
    mode = e.get("mode", "standalone")
    if mode not in EXTERNAL_MODES:
        raise SpecError(f"{path}.mode", f"unknown external Redis mode {mode!r}", EXTERNAL_MODES)
    if mode == "standalone":
        url = _standalone_url(e, path)
        addresses: tuple[topology.Address, ...] = ()
        master_name: str | None = None
        tls = urlsplit(url).scheme == "rediss"
    else:
        addresses, master_name, tls = _topology(e, path, mode)
        url = topology.format_url(mode, addresses, master_name=master_name, tls=tls)
    if e.get("passwordSecretRef") is None:
        raise SpecError(f"{path}.passwordSecretRef", "is required", "{name: <secret>, key: <key, default password>}")
    password = _secret_ref(e["passwordSecretRef"], f"{path}.passwordSecretRef", "password")
    username = None
    if e.get("usernameSecretRef") is not None:
        username = _secret_ref(e["usernameSecretRef"], f"{path}.usernameSecretRef", "username")
    return ExternalRedis(url=url, password=password, username=username, mode=cast(topology.Mode, mode),
                         addresses=addresses, master_name=master_name, tls=tls,
                         ca=_ca_ref(e.get("caSecretRef"), tls, mode))


def _ca_ref(raw: Any, tls: bool, mode: str) -> SecretKeyRef | None:
    """spec.backend.redis.external.caSecretRef: {name, key (default ca.crt)}, only with TLS."""
    path = "spec.backend.redis.external.caSecretRef"
    if raw is None:
        return None
    if not tls:
        if mode == "standalone":
            raise SpecError(path, "is only allowed with a TLS URL (spec.backend.redis.external.url is not "
                            "rediss://)", "a rediss://host:port URL, or remove caSecretRef")
        raise SpecError(path, f"is only allowed with TLS (spec.backend.redis.external.tls is not true, mode {mode})",
                        "tls: true, or remove caSecretRef")
    return _secret_ref(raw, path, "ca.crt")


def _standalone_url(e: Mapping[str, Any], path: str) -> str:
    for other in ("addresses", "masterName", "tls"):
        if e.get(other) is not None:
            raise SpecError(f"{path}.{other}", "is only allowed with external mode sentinel or cluster "
                            "(mode is 'standalone': the url says everything, rediss:// for TLS)",
                            "remove it, or set spec.backend.redis.external.mode: cluster or sentinel")
    url = e.get("url")
    if not isinstance(url, str) or not url:
        raise SpecError(f"{path}.url", "is required with external mode standalone",
                        "redis://host[:port][/db] or rediss://host[:port][/db]")
    try:
        check_redis_url(f"{path}.url", url)
    except ConfigError as err:
        raise SpecError(err.field, err.problem, err.allowed) from None
    parts = urlsplit(url)
    if not _HOST.match((parts.hostname or "").rstrip(".").lower()) or parts.port == 0:
        raise SpecError(f"{path}.url", "does not name a host and port", "redis[s]://host[:port 1..65535][/db], host "
                        "a DNS name, an IPv4 address or [an IPv6 address]")
    check_external_host(f"{path}.url", parts.hostname or "")
    return url


def _topology(e: Mapping[str, Any], path: str, mode: str) -> tuple[tuple[topology.Address, ...], str | None, bool]:
    """addresses, masterName and tls of a cluster or sentinel; the url is built from them."""
    if e.get("url") is not None:
        raise SpecError(f"{path}.url", f"is only allowed with external mode standalone (mode is {mode!r}: the "
                        "pods' URL is built from addresses" + (" and masterName)" if mode == "sentinel" else ")"),
                        "remove url; list the nodes under spec.backend.redis.external.addresses")
    what = "seed nodes of the cluster" if mode == "cluster" else "sentinels"
    raw = e.get("addresses")
    if not isinstance(raw, list) or not raw:
        raise SpecError(f"{path}.addresses", f"is required with external mode {mode}: the {what}",
                        f"a list of 1 to {topology.MAX_ADDRESSES} {topology.ADDRESS_FORM}")
    if len(raw) > topology.MAX_ADDRESSES:
        raise SpecError(f"{path}.addresses", f"has {len(raw)} entries", f"at most {topology.MAX_ADDRESSES}")
    addresses: list[topology.Address] = []
    for i, item in enumerate(raw):
        field = f"{path}.addresses[{i}]"
        try:
            address = topology.parse_address(field, item)
        except ConfigError as err:
            raise SpecError(err.field, err.problem, err.allowed) from None
        check_external_host(field, address[0])
        if address in addresses:
            raise SpecError(field, f"{item!r} is listed twice", "each address once")
        addresses.append(address)
    master_name = e.get("masterName")
    if mode == "sentinel":
        if not isinstance(master_name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,128}", master_name):
            problem = "is required with external mode sentinel" if master_name is None else \
                f"{master_name!r} is not a master name"
            raise SpecError(f"{path}.masterName", problem, topology.MASTER_NAME_FORM)
    elif master_name is not None:
        raise SpecError(f"{path}.masterName", "is only allowed with external mode sentinel (mode is 'cluster')",
                        "remove it")
    tls = e.get("tls", False)
    if not isinstance(tls, bool):
        raise SpecError(f"{path}.tls", f"must be a boolean, got {tls!r}", ("true", "false"))
    return tuple(addresses), master_name, tls


def check_external_host(path: str, host: str) -> None:
    """Refuse hosts that would make the pods (and the operator's probe and admin) talk to a
    link-local or cloud metadata address. Host names are not resolved here (DNS may change after
    admission)."""
    host = host.rstrip(".").lower()
    allowed = "a Redis host that is not link-local (169.254.0.0/16, fe80::/10) or a cloud metadata service"
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
    ref = mapping(raw, path)
    known(ref, path, ("name", "key"))
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
    p = mapping(raw, path)
    known(p, path, ("enabled", "size", "storageClassName"))
    enabled = p.get("enabled", False)
    if not isinstance(enabled, bool):
        raise SpecError(f"{path}.enabled", f"must be a boolean, got {enabled!r}", ("true", "false"))
    size = p.get("size", "1Gi")
    if not isinstance(size, str) or not SIZE.match(size) or not 0 < quantity(size) <= MAX_STORAGE:
        raise SpecError(f"{path}.size", f"{size!r} is not a storage size above 0 and at most 64Ti",
                        "e.g. 1Gi, 500Mi, 10G")
    sc = p.get("storageClassName")
    if sc is not None and (not isinstance(sc, str) or not sc or len(sc) > 253):
        raise SpecError(f"{path}.storageClassName", f"{sc!r} is not a StorageClass name",
                        "a StorageClass name, or omit for the cluster default")
    return Persistence(enabled=enabled, size=size, storage_class=sc)
