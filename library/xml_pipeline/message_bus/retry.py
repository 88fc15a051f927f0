"""The wait between attempts while Redis is unavailable, shared by every loop that sits an outage
out (dispatcher, worker, ingress bridge, the CLI waiting for its backend)."""
from __future__ import annotations

import logging

from redis.exceptions import ClusterDownError, ResponseError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

#: The errors of an outage (worth waiting out); anything else is a real failure.
_REDIS_DOWN = (RedisConnectionError, RedisTimeoutError)

#: Replies of a Redis Cluster that mean "not here, not now" rather than "wrong": a blocked read
#: whose stream moved to another node during a resharding (UNBLOCKED), a slot in the middle of a
#: migration (TRYAGAIN), a cluster briefly without a majority (CLUSTERDOWN).
_TRANSIENT_REPLIES = ("UNBLOCKED", "TRYAGAIN", "CLUSTERDOWN")


def transient_reply(error: ResponseError) -> bool:
    """True for an error reply worth waiting out like an outage (the next attempt re-routes)."""
    return isinstance(error, (TryAgainError, ClusterDownError)) or str(error).startswith(_TRANSIENT_REPLIES)


class Backoff:
    """How long to wait before the next attempt while Redis is unavailable: 0.2 s, doubled after
    every failed attempt up to 5 s; `reset()` after a success. One per loop (not thread-safe)."""

    __slots__ = ("delay",)
    FIRST = 0.2
    LONGEST = 5.0

    def __init__(self) -> None:
        self.delay = self.FIRST

    def reset(self) -> None:
        self.delay = self.FIRST

    def next(self) -> float:
        """The wait before the next attempt; the one after is twice as long (at most LONGEST)."""
        delay = self.delay
        self.delay = min(delay * 2, self.LONGEST)
        return delay

    def retrying(self, logger: logging.Logger, subject: str, cause: object) -> float:
        """Log "<subject>: Redis unavailable (<cause>); retrying in <wait> s" and return the wait."""
        delay = self.next()
        logger.warning("%s: Redis unavailable (%s); retrying in %.1f s", subject, cause, delay)
        return delay
