"""Per-key quotas, shared by every API process through Redis.

A token bucket limits submissions per key: each evaluation costs one token (a batch one per
evaluation). A cap limits how many of a key's evaluations may be queued or running at once;
both are checked, and the new evaluations counted, in one Lua call (`lua/quota.lua`'s `admit`,
which the broker's `submit` also runs, so one evaluation's quota, record and message cost one
round trip), and every final status change (`lua/status.lua`'s `transition()`) takes
evaluations out of that set (`{ns}:active:<key id>`) as they finish.
Refusals are 429 with `Retry-After`; every answer to a submission carries `RateLimit-Limit`,
`RateLimit-Remaining` and `RateLimit-Reset` (the IETF draft's fields).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import redis.asyncio as aioredis
import structlog
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from evaluations import json_codec
from evaluations.api_keys import ApiKey
from evaluations.errors import LimitExceeded, TooLarge
from evaluations.redis_keys import RedisKeys

log = structlog.get_logger(__name__)

#: How long a count of open streams lives after its last change.
STREAM_COUNTER_TTL_S = 3600

#: `admit()`, for scripts that count a quota (prepended to them).
QUOTA_FUNCTION_LUA = (Path(__file__).parent / "lua" / "quota.lua").read_text()
QUOTA_LUA = QUOTA_FUNCTION_LUA + (Path(__file__).parent / "lua" / "quota_check.lua").read_text()
READS_LUA = QUOTA_FUNCTION_LUA + (Path(__file__).parent / "lua" / "read_check.lua").read_text()
#: Rows of a list page one read token pays for.
ROWS_PER_READ = 50


@dataclass(frozen=True)
class Allowance:
    limit: int
    remaining: int
    reset_s: int

    def headers(self) -> dict[str, str]:
        return {
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Remaining": str(self.remaining),
            "RateLimit-Reset": str(self.reset_s),
        }


def stored_limit(limits: dict[str, float]) -> int:
    """Bytes a key's finished evaluations may store in an hour (0: no limit)."""
    return int(limits["stored_mb_per_hour"] * 2**20)


class RateLimiter:
    def __init__(self, client: aioredis.Redis, namespace: str, limits: dict[str, dict[str, float]]) -> None:
        self.client = client
        self.ns = namespace
        self.keys = RedisKeys(namespace)
        self.limits = limits
        self._admit = client.register_script(QUOTA_LUA)
        self._read = client.register_script(READS_LUA)

    async def take_reads(self, key: ApiKey, rows: int = 1) -> None:
        """Count one read by `key` (a list page: one per `ROWS_PER_READ` rows), or raise 429.
        Unmetered while Redis does not answer, as submissions are."""
        limits = self.limits[key.tier]
        rate, burst = limits["reads_per_second"], int(limits["read_burst"])
        cost = min(burst, max(1, math.ceil(rows / ROWS_PER_READ)))
        try:
            admitted, _, wait_ms = await self._read(
                keys=[self.keys.read_bucket(key.id)], args=[rate, burst, cost]
            )
        except (RedisConnectionError, RedisTimeoutError) as exc:
            log.warning("ratelimit.unavailable", key_id=key.id, error=str(exc))
            return
        if not admitted:
            retry_after = max(1, math.ceil(int(wait_ms) / 1000))
            raise LimitExceeded(
                "read rate limit exceeded for this key",
                headers={"Retry-After": str(retry_after)},
                retry_after=retry_after,
            )

    async def take(self, key: ApiKey, eval_ids: list[str]) -> Allowance:
        """Admit these new evaluations for `key` (counted in progress at once), or raise 429.

        Check and count are one Lua call, so concurrent requests cannot overshoot the cap.
        If Redis does not answer, the submission is let through (logged): the quota lives in
        Redis, and refusing would also stop the hot standby to the legacy deployment.
        """
        limits = self.limits[key.tier]
        burst = int(limits["burst"])
        if len(eval_ids) > burst:
            raise TooLarge(f"at most {burst} evaluations at once for this key", field="evaluations")
        try:
            reply = await self._admit(
                keys=[self.keys.bucket(key.id), self.keys.active(key.id), self.keys.stored_bytes(key.id)],
                args=[
                    limits["per_second"],
                    burst,
                    int(limits["max_active"]),
                    stored_limit(limits),
                    *eval_ids,
                ],
            )
        except (RedisConnectionError, RedisTimeoutError) as exc:
            log.warning("ratelimit.unavailable", key_id=key.id, error=str(exc))
            return self.unmetered(key)
        return self.settle(key, reply)

    def unmetered(self, key: ApiKey) -> Allowance:
        """What a submission Redis could not count is told: the whole burst."""
        burst = int(self.limits[key.tier]["burst"])
        return Allowance(burst, burst, 0)

    def claim(self, key: ApiKey, eval_id: str) -> str:
        """`key`'s quota for one evaluation, as the broker's `submit` takes it with the record."""
        limits = self.limits[key.tier]
        return json_codec.dumps([
            self.keys.bucket(key.id), self.keys.active(key.id),
            limits["per_second"], int(limits["burst"]), int(limits["max_active"]), eval_id,
            self.keys.stored_bytes(key.id), stored_limit(limits),
        ])  # fmt: skip

    def settle(self, key: ApiKey, reply: Sequence[Any]) -> Allowance:
        """`admit()`'s answer (lua/quota.lua): the allowance left, or the 429 it refused with."""
        limits = self.limits[key.tier]
        burst = int(limits["burst"])
        admitted, second, third = reply
        if admitted:
            return Allowance(burst, int(second), math.ceil(int(third) / 1000))
        reason = second.decode() if isinstance(second, bytes) else second
        if reason == "stored":
            retry_after = 3600 - int(time.time()) % 3600  # the next hour's counter starts at 0
            raise LimitExceeded(
                f"stored-bytes quota exceeded for this key: {int(third) / 2**20:.1f} MB stored by "
                f"evaluations finished this hour, at most {limits['stored_mb_per_hour']:g} MB",
                headers={"Retry-After": str(retry_after)},
                retry_after=retry_after,
            )
        if reason == "active":
            raise LimitExceeded(
                f"too many evaluations in progress for this key ({third} queued or running, "
                f"at most {int(limits['max_active'])})",
                headers={"Retry-After": "1"},
                retry_after=1,
            )
        retry_after = max(1, math.ceil(int(third) / 1000))
        raise LimitExceeded(
            "rate limit exceeded for this key",
            headers={
                "Retry-After": str(retry_after),
                "RateLimit-Limit": str(burst),
                "RateLimit-Remaining": "0",
                "RateLimit-Reset": str(retry_after),
            },
            retry_after=retry_after,
        )

    @contextlib.asynccontextmanager
    async def stream(self, key: ApiKey) -> AsyncIterator[None]:
        """Hold one of `key`'s event-stream places while a stream is open (each holds a
        connection to the API); 429 when all are taken."""
        counter = self.keys.streams(key.id)
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.incr(counter)
            pipe.expire(counter, STREAM_COUNTER_TTL_S)  # a process that died cannot hold places forever
            open_now, _ = await pipe.execute()
        try:
            if open_now > self.limits[key.tier]["max_streams"]:
                raise LimitExceeded(
                    f"too many event streams open for this key ({open_now - 1})",
                    headers={"Retry-After": "5"},
                )
            yield
        finally:
            # the stream usually ends by being cancelled (the client left): finish this anyway
            with anyio.CancelScope(shield=True):
                await self.client.decr(counter)

    async def release(self, key: ApiKey, eval_ids: list[str]) -> None:
        """Give back places taken for evaluations that were not submitted after all."""
        if eval_ids:
            await self.client.srem(self.keys.active(key.id), *eval_ids)
