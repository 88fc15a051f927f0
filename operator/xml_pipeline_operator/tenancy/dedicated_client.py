"""The client user on an organism's dedicated Redis, changed while that Redis runs.

A dedicated Redis gets its client user from a `user` line of the configuration it reads at start
(desired/redis.py), with the binding's password. That is all a steady state needs: idle passes never
connect. To rotate the client password without a restart (and with both passwords accepted meanwhile),
the operator logs in to the dedicated Redis as its `default` user (the organism's credentials Secret)
and runs the same ACL SETUSER as on the shared Redis (client_acl.ensure_client_user). The Redis's
NetworkPolicy admits the operator's pods for this (desired/redis.py).

Passwords are never logged and never put in messages.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from collections.abc import Set as AbstractSet

import redis

from xml_pipeline.memory.config import redact_url

from ..redis_admin import TenantState
from . import client_acl

logger = logging.getLogger(__name__)

#: Seconds to connect and per command: short, a reconcile thread waits for it.
TIMEOUT_SECONDS = 3.0


class DedicatedClientAdmin:
    """ACL SETUSER of organisms' client users on their dedicated Redis servers. Thread-safe (one
    connection per call: calls are rare, during a rotation only)."""

    def __init__(self, *, resolve: Callable[[str], str] | None = None, timeout: float = TIMEOUT_SECONDS) -> None:
        #: Maps the endpoint the pods use to the URL the operator connects to (tests: a local server).
        self.resolve: Callable[[str], str] = resolve or (lambda url: url)
        self.timeout = timeout

    def ensure_client(self, endpoint: str, admin_password: str, username: str, password: str, prefix: str,
                      also_accept_hashes: AbstractSet[str] = frozenset()) -> TenantState:
        """Make the client user accept exactly `password` and `also_accept_hashes` (its rights as the
        config line gives them). Never raises for a Redis problem: the state says what went wrong."""
        url = self.resolve(endpoint)
        client = redis.Redis.from_url(url, password=admin_password or None, socket_connect_timeout=self.timeout,
                                      socket_timeout=self.timeout, retry_on_timeout=False)
        try:
            change = client_acl.ensure_client_user(client, username, password, prefix,
                                                   also_accept_hashes=also_accept_hashes)
        except redis.AuthenticationError as e:
            return TenantState(False, "DedicatedRedisAuthFailed",
                               f"the dedicated Redis at {redact_url(endpoint)} refused the organism's own password "
                               f"({_scrub(e, admin_password, password)})")
        except redis.RedisError as e:
            return TenantState(False, "DedicatedRedisUnavailable",
                               f"cannot change client user {username!r} on the dedicated Redis at "
                               f"{redact_url(endpoint)}: {type(e).__name__}: {_scrub(e, admin_password, password)}")
        finally:
            client.close()
        logger.info("client user %s on %s: %s", username, redact_url(endpoint), change.value)
        return TenantState(True, "ClientUserReady", f"client user {username!r} accepts "
                           f"{1 + len(also_accept_hashes)} password(s)")


def _scrub(error: Exception, *secrets: str) -> str:
    text = str(error)
    for s in secrets:
        if s:
            text = text.replace(s, "***")
    return text
