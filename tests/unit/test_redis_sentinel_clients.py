"""Clients of Crucible's own Redis made through Sentinels (no server needed to build them)."""

from __future__ import annotations

import pytest

from infra.redis_client import (
    POOL_SIZE,
    _WaitingSentinelPool,
    async_client_for,
    describe_redis,
    sync_client_for,
)
from infra.settings import ConfigError, Settings


def settings(monkeypatch: pytest.MonkeyPatch, **env: str) -> Settings:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return Settings.from_env()


def test_sentinels_are_read_as_host_port_pairs(monkeypatch: pytest.MonkeyPatch) -> None:
    s = settings(monkeypatch, REDIS_SENTINELS="10.0.0.1:26379, [::1]:26380", CRUCIBLE_REDIS_MIN_REPLICAS="1")
    assert s.redis_sentinels == (("10.0.0.1", 26379), ("::1", 26380))
    assert (s.redis_sentinel_master, s.redis_min_replicas) == ("crucible", 1)
    monkeypatch.setenv("REDIS_SENTINELS", "nohost")
    with pytest.raises(ConfigError, match="REDIS_SENTINELS"):
        Settings.from_env()


async def test_the_async_client_keeps_the_waiting_pool_and_takes_db_and_password(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    s = settings(
        monkeypatch, REDIS_SENTINELS="127.0.0.1:1", REDIS_SENTINEL_MASTER="m", REDIS_URL="redis://ignored:9/3",
        REDIS_PASSWORD="pw",
    )  # fmt: skip
    client = async_client_for(s)
    pool = client.connection_pool
    assert isinstance(pool, _WaitingSentinelPool)
    assert (pool.max_connections, pool.service_name) == (POOL_SIZE, "m")
    assert (pool.connection_kwargs["db"], pool.connection_kwargs["password"]) == (3, "pw")
    assert "host" not in pool.connection_kwargs
    assert describe_redis(s) == "sentinel://127.0.0.1:1/m"
    await client.aclose()
    sync = sync_client_for(s)
    assert sync.connection_pool.service_name == "m"
    assert sync.connection_pool.connection_kwargs["db"] == 3
    sync.close()
