"""Redis topologies the operator writes and administers: one server, a Redis Cluster, a Sentinel set.

The pods learn the topology from XP_REDIS_URL alone; the URL forms and their parsing are the
library's contract (xml_pipeline.contract.parse_redis_url), so the operator and the pods can never
read one URL two ways. This module adds what only the operator needs on top of the contract's
result: the host and port of a standalone URL, host names it can put in a Service or a KEDA trigger
(`parse_address`: DNS names and IP addresses only), and `format_url`, which builds the URL of an
Organism's `external` block. The operator's shared Redis (XPO_SHARED_REDIS_URL) may be any of the
three; a unix socket is not a topology the operator can administer.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from xml_pipeline import contract
from xml_pipeline.errors import ConfigError

Mode = contract.RedisMode
MODES: tuple[str, ...] = contract.REDIS_MODES
URL_FORMS = contract.REDIS_URL_FORMS
ADDRESS_FORM = "host:port (a DNS name, an IPv4 address or [an IPv6 address], port 1..65535), e.g. redis-0.redis:6379"
MASTER_NAME_FORM = "letters, digits, '_', '.' and '-' (1 to 128 characters), e.g. mymaster"
#: Addresses an Organism's `external.addresses` may list (the contract accepts longer URLs).
MAX_ADDRESSES = 32
_HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?\Z")
_IPV6 = re.compile(r"^[0-9A-Fa-f:.]+\Z")

Address = tuple[str, int]


@dataclass(frozen=True)
class Topology:
    """What a Redis URL names. `addresses` are the seeds (cluster) or the sentinels (sentinel); for a
    standalone URL the one server."""

    mode: Mode
    addresses: tuple[Address, ...]
    tls: bool = False
    master_name: str | None = None
    #: The URL as given (standalone: what redis-py reads, database included).
    url: str = ""


def _check_host(field: str, host: str, shown: str) -> str:
    """A DNS name, an IPv4 or an IPv6 address (no '_', no trailing dot): what a Service, a NetworkPolicy
    or a KEDA trigger can name. Lower-cased."""
    if not (_IPV6.match(host) if ":" in host else _HOSTNAME.match(host)):
        raise ConfigError(field, f"{shown!r} is not host:port", ADDRESS_FORM)
    return host.lower()


def parse_address(field: str, text: object) -> Address:
    """`host:port` (or `[v6]:port`) with a port, parsed as a node of a contract URL; raises ConfigError
    naming `field`."""
    if not isinstance(text, str) or not text or len(text) > 300:
        raise ConfigError(field, f"{text!r} is not an address", ADDRESS_FORM)
    host, port = contract.parse_redis_node(text, 0, field)
    if port == 0:  # no port named: an Organism's addresses always say it
        raise ConfigError(field, f"{text!r} is not host:port", ADDRESS_FORM)
    return _check_host(field, host, text), port


def format_address(address: Address) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def format_url(mode: str, addresses: tuple[Address, ...], *, master_name: str | None = None,
               tls: bool = False) -> str:
    """The XP_REDIS_URL of a cluster or sentinel topology (no credentials, by construction); it reads
    back through contract.parse_redis_url as the same topology."""
    schemes = {"cluster": contract.CLUSTER_SCHEMES, "sentinel": contract.SENTINEL_SCHEMES}.get(mode)
    if schemes is None:
        raise ValueError(f"format_url builds cluster and sentinel URLs, not {mode!r}")
    scheme = schemes[1] if tls else schemes[0]  # (redis+..., rediss+...)
    nodes = ",".join(format_address(a) for a in addresses)
    if mode == "sentinel":
        if not master_name:
            raise ValueError("a sentinel URL needs the master name")
        return f"{scheme}://{nodes}/{master_name}"
    return f"{scheme}://{nodes}"


def parse_url(field: str, url: str) -> Topology:
    """The topology of a Redis URL as the library's contract reads it (contract.parse_redis_url), with
    a standalone URL's one server, and every node's host checked as `parse_address` does. Raises
    ConfigError naming `field` and the allowed forms (never echoing credentials)."""
    target = contract.parse_redis_url(url, field)
    if target.mode == "standalone":
        parts = urlsplit(url)
        if parts.scheme.lower() == "unix":
            raise ConfigError(field, "names a unix socket: the operator reaches Redis over TCP",
                              "redis://host[:port][/db] or rediss://host[:port][/db]")
        return Topology("standalone", ((parts.hostname or "", parts.port or contract.DEFAULT_REDIS_PORT),),
                        tls=target.tls, url=url)
    addresses = tuple((_check_host(field, host, format_address((host, port))), port) for host, port in target.nodes)
    return Topology(target.mode, addresses, tls=target.tls, master_name=target.master_name, url=url)
