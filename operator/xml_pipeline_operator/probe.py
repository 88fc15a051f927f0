"""Probe an external Redis the way the Organism's pods will use it: same URL, same credentials.

The operator does not run an external Redis, but it can tell the user early what the pods would
find: a wrong password in the referenced Secret, a host nobody can reach. One PING with short
timeouts, from a kopf handler thread. The answer becomes the Organism's RedisReady condition.

A Redis Cluster is probed on its seed nodes (the first that answers decides), a Sentinel set on the
master the sentinels name (asked without credentials, as the pods ask them).

What the probe cannot know: whether the *pods* can reach a Redis the operator cannot (a
NetworkPolicy that admits the pods but not the operator). For that setup the probe is switched off
with XPO_PROBE_EXTERNAL_REDIS=false (chart value `probeExternalRedis: false`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import redis
from redis.exceptions import AuthenticationError, AuthorizationError, NoPermissionError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

#: Seconds to connect and to wait for the PONG: short, a handler thread waits for it.
PROBE_TIMEOUT = 3.0


@dataclass(frozen=True)
class ProbeResult:
    #: "Reachable", "AuthFailed" or "Unreachable".
    outcome: str
    detail: str

    @property
    def ok(self) -> bool:
        return self.outcome == "Reachable"


def probe_topology(url: str, username: str | None, password: str | None, *,
                   timeout: float = PROBE_TIMEOUT, ca: str | None = None) -> ProbeResult:
    """probe_redis for any XP_REDIS_URL form: one server, a cluster's seeds, a Sentinel set's master."""
    from .topology import format_address, parse_url
    top = parse_url("url", url)
    if top.mode == "standalone":
        return probe_redis(url, username, password, timeout=timeout, ca=ca)
    scheme = "rediss" if top.tls else "redis"
    if top.mode == "cluster":
        targets = [f"{scheme}://{format_address(a)}" for a in top.addresses]
    else:
        master, why = _sentinel_master(top.addresses, top.master_name or "", top.tls, timeout, ca)
        if master is None:
            return ProbeResult("Unreachable", why)
        targets = [f"{scheme}://{format_address(master)}"]
    failures = []
    for target in targets:
        result = probe_redis(target, username, password, timeout=timeout, ca=ca)
        if result.outcome != "Unreachable":
            return ProbeResult(result.outcome, f"{target.partition('://')[2]}: {result.detail}")
        failures.append(f"{target.partition('://')[2]}: {result.detail}")
    return ProbeResult("Unreachable", "; ".join(failures))


def _sentinel_master(sentinels: tuple[tuple[str, int], ...], name: str, tls: bool,
                     timeout: float, ca: str | None) -> tuple[tuple[str, int] | None, str]:
    """The master's address as the first answering sentinel names it, or None and why not."""
    failures = []
    for host, port in sentinels:
        client = redis.Redis(host=host, port=port, ssl=tls, socket_connect_timeout=timeout, socket_timeout=timeout,
                             ssl_ca_data=ca if ca and tls else None)
        try:
            reply = client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", name)
        except (RedisConnectionError, RedisTimeoutError, ResponseError, OSError) as e:
            failures.append(f"sentinel {host}:{port}: {type(e).__name__}")
            continue
        finally:
            client.close()
        if reply:
            addr = [v.decode() if isinstance(v, bytes) else str(v) for v in reply]
            return (addr[0], int(addr[1])), ""
        failures.append(f"sentinel {host}:{port} does not know master {name!r}")
    return None, "; ".join(failures)


def probe_redis(url: str, username: str | None, password: str | None, *,
                timeout: float = PROBE_TIMEOUT, ca: str | None = None) -> ProbeResult:
    """PING `url` as `username`/`password`. Never raises; the detail never contains the password.
    `ca`: PEM CA certificate(s) a rediss:// server is verified against (the pods' CA file holds the same)."""
    def scrub(error: Exception) -> str:
        text = f"{type(error).__name__}: {error}"
        return text.replace(password, "***") if password else text

    # No client name: CLIENT SETNAME is a command the Redis user might not be granted (AUTH and
    # PING are all the probe sends).
    client = redis.Redis.from_url(url, username=username or None, password=password or None,
                                  socket_connect_timeout=timeout, socket_timeout=timeout, retry_on_timeout=False,
                                  **({"ssl_ca_data": ca} if ca and url.startswith("rediss") else {}))
    start = time.monotonic()
    try:
        client.ping()
    except (AuthenticationError, AuthorizationError, NoPermissionError) as e:
        return ProbeResult("AuthFailed", scrub(e))
    except ResponseError as e:  # NOAUTH (no password given but one is required), NOPERM on PING
        if any(word in str(e) for word in ("NOAUTH", "WRONGPASS", "NOPERM", "invalid password")):
            return ProbeResult("AuthFailed", scrub(e))
        return ProbeResult("Unreachable", scrub(e))
    except (RedisConnectionError, RedisTimeoutError, OSError) as e:
        return ProbeResult("Unreachable", scrub(e))
    finally:
        client.close()
    return ProbeResult("Reachable", f"PING answered in {(time.monotonic() - start) * 1000:.0f} ms")
