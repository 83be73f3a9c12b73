"""Per-key quotas, shared by every API process through Redis.

A token bucket (`lua/token_bucket.lua`) limits submissions per key: each evaluation costs
one token (a batch costs one per evaluation). A second cap limits how many of a key's
evaluations may be queued or running at once; `transition.lua` keeps that set
(`{ns}:active:<key id>`) exact as evaluations finish. Refusals are 429 with `Retry-After`;
every answer to a submission carries `RateLimit-Limit`, `RateLimit-Remaining` and
`RateLimit-Reset` (the IETF draft's fields).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import redis.asyncio as aioredis
import structlog
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from app.errors import RequestError
from app.keys import ApiKey

log = structlog.get_logger(__name__)

BUCKET_LUA = (Path(__file__).parent / "lua" / "token_bucket.lua").read_text()


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


def active_key(namespace: str, key_id: str) -> str:
    return f"{namespace}:active:{key_id}"


class RateLimiter:
    def __init__(self, client: aioredis.Redis, namespace: str, limits: dict[str, dict[str, float]]) -> None:
        self.client = client
        self.ns = namespace
        self.limits = limits
        self._bucket = client.register_script(BUCKET_LUA)

    async def take(self, key: ApiKey, cost: int) -> Allowance:
        """Spend `cost` submissions of `key`'s allowance, or raise 429 saying when to retry.

        If Redis does not answer, the submission is let through (logged): the quota lives in
        Redis, and refusing would also stop the hot standby to the legacy deployment.
        """
        try:
            return await self._take(key, cost)
        except (RedisConnectionError, RedisTimeoutError) as exc:
            log.warning("ratelimit.unavailable", key_id=key.id, error=str(exc))
            burst = int(self.limits[key.tier]["burst"])
            return Allowance(burst, burst, 0)

    async def _take(self, key: ApiKey, cost: int) -> Allowance:
        limits = self.limits[key.tier]
        burst = int(limits["burst"])
        active = await self.client.scard(active_key(self.ns, key.id))
        if active + cost > limits["max_active"]:
            raise RequestError(
                429,
                f"too many evaluations in progress for this key ({active} queued or running, "
                f"at most {int(limits['max_active'])})",
                retry_after=1,
                headers={"Retry-After": "1"},
            )
        if cost > burst:
            raise RequestError(413, f"at most {burst} evaluations at once for this key", field="evaluations")
        allowed, remaining, wait_ms, full_ms = await self._bucket(
            keys=[f"{self.ns}:bucket:{key.id}"], args=[limits["per_second"], burst, cost]
        )
        allowance = Allowance(burst, int(remaining), math.ceil(int(full_ms) / 1000))
        if not allowed:
            retry_after = str(max(1, math.ceil(int(wait_ms) / 1000)))
            raise RequestError(
                429,
                "rate limit exceeded for this key",
                retry_after=int(retry_after),
                headers={"Retry-After": retry_after, **allowance.headers()},
            )
        return allowance
