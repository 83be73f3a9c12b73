"""Redis clients made one way everywhere, so they behave alike across a Redis restart."""

from __future__ import annotations

import redis
import redis.asyncio as aioredis
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

#: A command that hits a dropped connection is retried on a fresh one this many times.
RETRIES = 5
_RETRY_ON = [RedisConnectionError, RedisTimeoutError]


def async_client(url: str, decode: bool = True) -> aioredis.Redis:
    """For the API and actors (decoded strings unless `decode` is False)."""
    from redis.asyncio.retry import Retry

    return aioredis.Redis.from_url(
        url,
        decode_responses=decode,
        retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), RETRIES),
        retry_on_error=_RETRY_ON,
        health_check_interval=15,
    )


def sync_client(url: str) -> redis.Redis:
    """For the broker (raw bytes: encoded messages). It never re-sends a command by itself:
    a lost reply to `fetch` would pop messages twice. Dramatiq restarts the consumer after a
    connection error and repeats settling commands, which the broker makes idempotent."""
    from redis.retry import Retry

    return redis.Redis.from_url(url, retry=Retry(ExponentialBackoff(), 0), health_check_interval=15)
