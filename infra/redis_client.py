"""Redis clients made one way everywhere, so they behave alike across a Redis restart."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import redis
import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection, Connection, SSLConnection, UnixDomainSocketConnection
from redis.asyncio.sentinel import (
    SentinelConnectionPool,
    SentinelManagedConnection,
    SentinelManagedSSLConnection,
)
from redis.backoff import ExponentialBackoff
from redis.connection import HiredisRespSerializer
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import MaxConnectionsError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.utils import HIREDIS_AVAILABLE

if TYPE_CHECKING:
    from infra.settings import Settings

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


class _HiredisSentinelConnection(_HiredisPacking, SentinelManagedConnection):
    pass


class _HiredisSentinelSSLConnection(_HiredisPacking, SentinelManagedSSLConnection):
    pass


class _WaitingSentinelPool(SentinelConnectionPool, _WaitingPool):
    """The same waiting pool, its connections going wherever the Sentinels say the master is
    (asked again on every new connection; idle ones to an old master are dropped)."""


#: How long a Sentinel may take to answer before the next one is asked.
SENTINEL_TIMEOUT_S = 0.5


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


def async_client(
    url: str, decode: bool = True, connect_timeout: float | None = None, password: str | None = None
) -> aioredis.Redis:
    """For the API and actors (decoded strings unless `decode` is False); commands run once
    and exit give a `connect_timeout`, so an unreachable host is an error, not a long wait.
    `password`: used when the URL carries none. For Crucible's own Redis use
    `async_client_for(settings)`, which also follows Sentinels."""

    pool = _WaitingPool.from_url(
        url, **_pool_options(decode, connect_timeout), **({"password": password} if password else {})
    )
    if HIREDIS_AVAILABLE:  # the connection class comes from the URL's scheme
        pool.connection_class = _PACKED_BY_HIREDIS.get(pool.connection_class, pool.connection_class)
    return aioredis.Redis.from_pool(pool)


def _pool_options(decode: bool, connect_timeout: float | None) -> dict[str, Any]:
    """How every async pool of ours behaves: it waits for a free connection, retries a command
    on a dropped one with back-off, checks idle connections' health."""
    from redis.asyncio.retry import Retry

    return {
        "max_connections": POOL_SIZE,
        "timeout": POOL_WAIT_S,
        "decode_responses": decode,
        "retry": Retry(ExponentialBackoff(cap=1.0, base=0.05), RETRIES),
        "retry_on_error": _RETRY_ON,
        "health_check_interval": 15,
        "socket_connect_timeout": connect_timeout,
    }


def sync_client(url: str, password: str | None = None) -> redis.Redis:
    """For the broker (raw bytes: encoded messages). It never re-sends a command by itself:
    a lost reply to `fetch` would pop messages twice. Dramatiq restarts the consumer after a
    connection error and repeats settling commands, which the broker makes idempotent."""
    from redis.retry import Retry

    extra = {"password": password} if password else {}
    return redis.Redis.from_url(url, retry=Retry(ExponentialBackoff(), 0), health_check_interval=15, **extra)


def _master_options(settings: Settings) -> dict[str, Any]:
    """What `REDIS_URL` says of the master beside its address (database, user, password, TLS
    options), for a client that asks the Sentinels where the master is."""
    from redis.connection import parse_url

    options = parse_url(settings.redis_url) if settings.redis_url else {}
    for unused in ("host", "port", "path", "connection_class"):
        options.pop(unused, None)
    if not options.get("password") and settings.redis_password:
        options["password"] = settings.redis_password
    return options


def _uses_tls(settings: Settings) -> bool:
    return bool(settings.redis_url and settings.redis_url.startswith("rediss://"))


def _sentinel_options(settings: Settings) -> dict[str, Any]:
    options: dict[str, Any] = {
        "socket_timeout": SENTINEL_TIMEOUT_S,
        "socket_connect_timeout": SENTINEL_TIMEOUT_S,
    }
    if settings.redis_sentinel_password:
        options["password"] = settings.redis_sentinel_password
    return options


def async_client_for(
    settings: Settings, decode: bool = True, connect_timeout: float | None = None
) -> aioredis.Redis:
    """`async_client` on Crucible's own Redis: `REDIS_URL`, or with `REDIS_SENTINELS` the master
    they name, followed through a fail-over (same pool size, waiting, retries and back-off)."""
    if not settings.redis_sentinels:
        return async_client(settings.redis_url_or_default, decode, connect_timeout, settings.redis_password)
    from redis.asyncio.sentinel import Sentinel

    sentinel = Sentinel(list(settings.redis_sentinels), sentinel_kwargs=_sentinel_options(settings))
    tls = _uses_tls(settings)
    if HIREDIS_AVAILABLE:
        connection_class: type = _HiredisSentinelSSLConnection if tls else _HiredisSentinelConnection
    else:
        connection_class = SentinelManagedSSLConnection if tls else SentinelManagedConnection
    return sentinel.master_for(
        settings.redis_sentinel_master,
        connection_pool_class=_WaitingSentinelPool,
        connection_class=connection_class,
        **_pool_options(decode, connect_timeout),
        **_master_options(settings),
    )


def sync_client_for(settings: Settings) -> redis.Redis:
    """`sync_client` on Crucible's own Redis, through the Sentinels when `REDIS_SENTINELS` is set."""
    if not settings.redis_sentinels:
        return sync_client(settings.redis_url_or_default, settings.redis_password)
    from redis.retry import Retry
    from redis.sentinel import Sentinel

    sentinel = Sentinel(list(settings.redis_sentinels), sentinel_kwargs=_sentinel_options(settings))
    return sentinel.master_for(
        settings.redis_sentinel_master,
        retry=Retry(ExponentialBackoff(), 0),
        health_check_interval=15,
        ssl=_uses_tls(settings),
        **_master_options(settings),
    )


def describe_redis(settings: Settings) -> str:
    """Where Crucible's Redis is, fit to show (no password)."""
    if settings.redis_sentinels:
        sentinels = ",".join(f"{host}:{port}" for host, port in settings.redis_sentinels)
        return f"sentinel://{sentinels}/{settings.redis_sentinel_master}"
    return redact_url(settings.redis_url_or_default)
