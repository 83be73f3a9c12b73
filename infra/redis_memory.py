"""How full Redis is, and refusing new work before Redis refuses writes.

With `maxmemory` and the `noeviction` policy (the embedded Valkey's and deploy/'s), a full
Redis refuses writes, mid-way through whatever was writing: a finishing run's result, a retry.
So new submissions are refused first, with a 503 naming the cause, once used memory passes
`CRUCIBLE_REDIS_FULL_SHARE` of `maxmemory`: what is queued and running can still finish and
the hourly cleanup makes room. A Redis without `maxmemory` is only reported on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from evaluations.errors import Unavailable

#: How long one reading of INFO serves (a submission must not pay a round trip for it).
READING_TTL_S = 1.0


@dataclass(frozen=True)
class MemoryUse:
    used_bytes: int
    max_bytes: int  # 0: no maxmemory set

    @property
    def share(self) -> float | None:
        return self.used_bytes / self.max_bytes if self.max_bytes else None

    def as_dict(self) -> dict[str, object]:
        share = self.share
        return {"used_mb": round(self.used_bytes / 2**20, 1), "max_mb": round(self.max_bytes / 2**20, 1),
                "used_share": None if share is None else round(share, 3)}  # fmt: skip


async def memory_use(client: aioredis.Redis) -> MemoryUse:
    info = await client.info("memory")
    return MemoryUse(int(info.get("used_memory", 0)), int(info.get("maxmemory", 0)))


class MemoryGuard:
    """One per process: refuses new submissions while Redis is nearly full."""

    def __init__(self, client: aioredis.Redis, full_share: float) -> None:
        self.client = client
        self.full_share = full_share
        self._last: MemoryUse | None = None
        self._read_at = 0.0

    async def current(self) -> MemoryUse:
        if self._last is None or time.monotonic() - self._read_at > READING_TTL_S:
            self._last = await memory_use(self.client)
            self._read_at = time.monotonic()
        return self._last

    async def check(self) -> None:
        """Raise `Unavailable` (503) while used memory is past the full share of maxmemory.
        A Redis that does not answer is let through here (the hot standby to the legacy
        deployment must keep working); what needs it fails on its own."""
        try:
            use = await self.current()
        except (RedisConnectionError, RedisTimeoutError):
            return
        share = use.share
        if share is not None and share >= self.full_share:
            raise Unavailable(
                f"storage nearly full ({share:.0%} of Redis's maxmemory): new submissions are refused "
                "until finished evaluations are cleaned up; try again later",
                headers={"Retry-After": "60"},
                retry_after=60,
            )
