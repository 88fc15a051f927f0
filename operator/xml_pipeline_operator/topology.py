"""Redis topologies the operator writes and administers: one server, a Redis Cluster, a Sentinel set.

The pods learn the topology from XP_REDIS_URL alone (the library's contract):

    redis://host[:port][/db], rediss://...                       one server (standalone)
    redis+cluster://host:port[,host:port...]                     Redis Cluster, by seed nodes
    redis+sentinel://host:port[,host:port...]/<master-name>      Sentinel: the sentinels, the master's name

with `rediss+` for TLS, and never credentials (they travel as XP_REDIS_USERNAME / XP_REDIS_PASSWORD).
`format_url` builds such a URL from an Organism's `external` block; `parse_url` reads one back (the
operator's shared Redis, XPO_SHARED_REDIS_URL, may be any of the three).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from xml_pipeline.errors import ConfigError

Mode = Literal["standalone", "sentinel", "cluster"]
MODES: tuple[str, ...] = ("standalone", "sentinel", "cluster")
SCHEMES: dict[tuple[str, bool], str] = {
    ("cluster", False): "redis+cluster", ("cluster", True): "rediss+cluster",
    ("sentinel", False): "redis+sentinel", ("sentinel", True): "rediss+sentinel",
}
URL_FORMS = ("redis://host[:port][/db], rediss://host[:port][/db], redis+cluster://host:port[,host:port...], "
             "rediss+cluster://..., redis+sentinel://host:port[,host:port...]/<master-name>, rediss+sentinel://...")
ADDRESS_FORM = "host:port (a DNS name, an IPv4 address or [an IPv6 address], port 1..65535), e.g. redis-0.redis:6379"
MASTER_NAME_FORM = "letters, digits, '_', '.' and '-' (1 to 128 characters), e.g. mymaster"
MAX_ADDRESSES = 32
_MASTER_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,128}\Z")
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


def parse_address(field: str, text: object) -> Address:
    """`host:port` (or `[v6]:port`) with a port; raises ConfigError naming `field`."""
    if not isinstance(text, str) or not text or len(text) > 300:
        raise ConfigError(field, f"{text!r} is not an address", ADDRESS_FORM)
    if text.startswith("["):
        host, bracket, tail = text[1:].partition("]")
        ok = bool(bracket) and tail.startswith(":") and bool(_IPV6.match(host))
        port_text = tail[1:]
    else:
        host, colon, port_text = text.rpartition(":")
        ok = bool(colon) and bool(_HOSTNAME.match(host))
    if not ok or not (port_text.isascii() and port_text.isdigit()) or not 1 <= int(port_text) <= 65535:
        raise ConfigError(field, f"{text!r} is not host:port", ADDRESS_FORM)
    return host.lower(), int(port_text)


def format_address(address: Address) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def format_url(mode: str, addresses: tuple[Address, ...], *, master_name: str | None = None,
               tls: bool = False) -> str:
    """The XP_REDIS_URL of a cluster or sentinel topology (no credentials, by construction)."""
    if mode not in ("cluster", "sentinel"):
        raise ValueError(f"format_url builds cluster and sentinel URLs, not {mode!r}")
    nodes = ",".join(format_address(a) for a in addresses)
    if mode == "sentinel":
        if not master_name:
            raise ValueError("a sentinel URL needs the master name")
        return f"{SCHEMES[(mode, tls)]}://{nodes}/{master_name}"
    return f"{SCHEMES[(mode, tls)]}://{nodes}"


def parse_url(field: str, url: str) -> Topology:
    """Read a cluster or sentinel URL into its addresses; a standalone URL gives its one server.
    Raises ConfigError naming `field` and the allowed forms (never echoing credentials)."""
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    mode_tls = {v: k for k, v in SCHEMES.items()}.get(scheme)
    if mode_tls is None:
        from urllib.parse import urlsplit
        if scheme not in ("redis", "rediss") or not sep:
            raise ConfigError(field, f"has the scheme {scheme[:20]!r}", URL_FORMS)
        parts = urlsplit(url)
        return Topology("standalone", ((parts.hostname or "", parts.port or 6379),), tls=scheme == "rediss", url=url)
    mode, tls = mode_tls
    netloc, slash, path = rest.partition("/")
    if "@" in netloc:
        raise ConfigError(field, "must not contain credentials", URL_FORMS)
    if "?" in rest or "#" in rest:
        raise ConfigError(field, "must not have a query or fragment", URL_FORMS)
    items = netloc.split(",")
    if len(items) > MAX_ADDRESSES:
        raise ConfigError(field, f"names {len(items)} nodes", f"at most {MAX_ADDRESSES}")
    addresses = tuple(parse_address(field, item) for item in items)
    if mode == "cluster":
        if path:
            raise ConfigError(field, f"has the path /{path[:20]}: a Redis Cluster has only database 0",
                              "redis+cluster://host:port[,host:port...] with no path")
        return Topology("cluster", addresses, tls=tls, url=url)
    if not slash or not _MASTER_NAME.match(path):
        raise ConfigError(field, "does not end with a valid /<master-name>", MASTER_NAME_FORM)
    return Topology("sentinel", addresses, tls=tls, master_name=path, url=url)


def mode_of(url: str) -> Mode:
    """The topology a URL's scheme names (no other validation)."""
    scheme = url.partition("://")[0].lower()
    for (mode, _tls), name in SCHEMES.items():
        if name == scheme:
            return "cluster" if mode == "cluster" else "sentinel"
    return "standalone"
