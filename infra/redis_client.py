"""Redis clients made one way everywhere, so they behave alike across a Redis restart."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis
import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection, Connection, SSLConnection, UnixDomainSocketConnection
from redis.backoff import ExponentialBackoff
from redis.connection import HiredisRespSerializer
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import MaxConnectionsError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.utils import HIREDIS_AVAILABLE

#: A command that hits a dropped connection is retried on a fresh one this many times.
RETRIES = 5
_RETRY_ON = [RedisConnectionError, RedisTimeoutError]
#: Connections one process opens to Redis at most. More commands in flight than that wait for a
#: free connection (a burst queues) rather than fail: redis-py's plain pool raises "Too many
#: connections" past its 100, which a burst of clients turned into 503s.
POOL_SIZE = 100
#: How long a command waits for a free connection before Redis counts as unavailable.
POOL_WAIT_S = 10.0


class _HiredisPacking:
    """redis-py's asyncio connections pack commands in Python, about a microsecond an argument
    (a tenth of `POST /api/eval`'s CPU); its sync ones let hiredis pack the same bytes."""

    _packer = HiredisRespSerializer()

    def pack_command(self, *args: Any) -> list[bytes]:
        return self._packer.pack(*args)


class _HiredisConnection(_HiredisPacking, Connection):
    pass


class _HiredisSSLConnection(_HiredisPacking, SSLConnection):
    pass


class _HiredisUnixConnection(_HiredisPacking, UnixDomainSocketConnection):
    pass


_PACKED_BY_HIREDIS: dict[type[AbstractConnection], type[AbstractConnection]] = {
    Connection: _HiredisConnection,
    SSLConnection: _HiredisSSLConnection,
    UnixDomainSocketConnection: _HiredisUnixConnection,
}


class _WaitingPool(aioredis.BlockingConnectionPool):
    """redis-py's pool that waits for a free connection, but only when there is none: its own
    `get_connection` arms a timer for every command, which cost `POST /api/eval` 6 %."""

    async def get_connection(self, *args: Any, **kwargs: Any) -> AbstractConnection:
        if self.can_get_connection():
            try:
                return await aioredis.ConnectionPool.get_connection(self, *args, **kwargs)
            except MaxConnectionsError:  # taken while a release held the lock: wait after all
                pass
        return await super().get_connection(*args, **kwargs)


def redis_location(url: str) -> str:
    """Which keys `url` reaches: host:port/db (or unix:path/db), without its credentials and
    with `localhost` read as 127.0.0.1, so two spellings of one database compare equal. A URL
    redis-py cannot read raises ValueError."""
    from redis.connection import parse_url

    options = parse_url(url)
    db = int(options.get("db") or 0)
    if "path" in options:
        return f"unix:{options['path']}/{db}"
    host = options.get("host") or "localhost"
    return f"{'127.0.0.1' if host == 'localhost' else host}:{options.get('port') or 6379}/{db}"


def redact_url(url: str) -> str:
    """A Redis URL without its password (in the user part or the query), fit to show."""
    parts = urlsplit(url)
    netloc = parts.netloc
    userinfo, at, host = netloc.rpartition("@")  # a password may itself hold '@'
    if at and ":" in userinfo:
        netloc = f"{userinfo.split(':', 1)[0]}:***@{host}"
    query = "&".join(
        "password=***" if pair.split("=", 1)[0] == "password" else pair for pair in parts.query.split("&")
    )
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def async_client(url: str, decode: bool = True, connect_timeout: float | None = None) -> aioredis.Redis:
    """For the API and actors (decoded strings unless `decode` is False); commands run once
    and exit give a `connect_timeout`, so an unreachable host is an error, not a long wait."""
    from redis.asyncio.retry import Retry

    pool = _WaitingPool.from_url(
        url,
        max_connections=POOL_SIZE,
        timeout=POOL_WAIT_S,
        decode_responses=decode,
        retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), RETRIES),
        retry_on_error=_RETRY_ON,
        health_check_interval=15,
        socket_connect_timeout=connect_timeout,
    )
    if HIREDIS_AVAILABLE:  # the connection class comes from the URL's scheme
        pool.connection_class = _PACKED_BY_HIREDIS.get(pool.connection_class, pool.connection_class)
    return aioredis.Redis.from_pool(pool)


def sync_client(url: str) -> redis.Redis:
    """For the broker (raw bytes: encoded messages). It never re-sends a command by itself:
    a lost reply to `fetch` would pop messages twice. Dramatiq restarts the consumer after a
    connection error and repeats settling commands, which the broker makes idempotent."""
    from redis.retry import Retry

    return redis.Redis.from_url(url, retry=Retry(ExponentialBackoff(), 0), health_check_interval=15)
