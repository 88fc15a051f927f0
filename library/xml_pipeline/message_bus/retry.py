"""The wait between attempts while Redis is unavailable, shared by every loop that sits an outage
out (dispatcher, worker, ingress bridge, the CLI waiting for its backend)."""
from __future__ import annotations

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

#: The errors of an outage (worth waiting out); anything else is a real failure.
_REDIS_DOWN = (RedisConnectionError, RedisTimeoutError)
