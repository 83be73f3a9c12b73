"""How full Redis is, and refusing new work before Redis refuses writes.

With `maxmemory` and the `noeviction` policy (the embedded Valkey's and deploy/'s), a full
Redis refuses writes, mid-way through whatever was writing: a finishing run's result, a retry.
So before that, past `CRUCIBLE_REDIS_SHED_SHARE` of `maxmemory`, what is cheapest to lose is
shed (`Shedding`, `evaluations/lua/shed.lua`): finished evaluations older than
`CRUCIBLE_MIN_RETENTION_S`, oldest first, then outputs over `CRUCIBLE_SHED_OUTPUT_BYTES`. Only
when that frees nothing and used memory passes `CRUCIBLE_REDIS_FULL_SHARE` are new submissions
refused, with a 503 naming the cause: what is queued and running can still finish. Queues,
messages and unfinished evaluations are never shed. A Redis without `maxmemory` is only
reported on.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass

import redis.asyncio as aioredis
import structlog
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from evaluations.errors import Unavailable
from evaluations.store import EvaluationStore

log = structlog.get_logger(__name__)

#: How long one reading of INFO serves (a submission must not pay a round trip for it)...
READING_TTL_S = 1.0
#: ... and near the shed line (within `NEAR_SHARE` of it), where a second of submissions could
#: carry a small Redis past both lines unseen.
NEAR_TTL_S = 0.1
NEAR_SHARE = 0.1
#: How long a submission waits for a reading: a Redis that does not answer as fast is passed
#: over here (INFO answers within a millisecond otherwise).
INFO_TIMEOUT_S = 0.5
#: A shedding round goes on until used memory is this far below the shed line (a share of
#: maxmemory), so it does not start again with the next submission.
SHED_MARGIN = 0.02
#: The longest one shedding round takes (a submission past the full line waits for it).
SHED_ROUND_S = 2.0
#: After a round that found nothing left to shed, the next starts no sooner than this.
SHED_IDLE_S = 1.0
#: The lock that lets one process shed at a time expires after this, should it die holding it.
SHED_LOCK_MS = 5000
_RELEASE_LUA = 'if redis.call("get", KEYS[1]) == ARGV[1] then return redis.call("del", KEYS[1]) end return 0'


@dataclass(frozen=True)
class Shedding:
    """What may be shed, and from when."""

    store: EvaluationStore
    #: the share of maxmemory past which it starts
    share: float
    #: finished evaluations younger than this stay (their outputs may still be trimmed)
    min_retention_s: float
    #: outputs and errors are trimmed to this many bytes (0: never)
    trim_bytes: int


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
    """One per process: sheds what is cheapest to lose while Redis fills up, and refuses new
    submissions once that is not enough."""

    def __init__(self, client: aioredis.Redis, full_share: float, shedding: Shedding | None = None) -> None:
        self.client = client
        self.full_share = full_share
        self.shedding = shedding
        self._last: MemoryUse | None = None
        self._read_at = 0.0
        self._round: asyncio.Task[None] | None = None
        self._idle_until = 0.0
        self._release = client.register_script(_RELEASE_LUA)

    async def current(self, fresh: bool = False) -> MemoryUse:
        if fresh or self._last is None or time.monotonic() - self._read_at > self._ttl(self._last):
            self._last = await memory_use(self.client)
            self._read_at = time.monotonic()
        return self._last

    def _ttl(self, last: MemoryUse) -> float:
        line = min(self.shedding.share, self.full_share) if self.shedding else self.full_share
        near = last.share is not None and last.share >= line - NEAR_SHARE
        return NEAR_TTL_S if near else READING_TTL_S

    async def check(self) -> None:
        """Past the shed line, start a shedding round (one at a time); past the full share of
        maxmemory, wait for it and raise `Unavailable` (503) if memory is still past it.
        A Redis that does not answer (within `INFO_TIMEOUT_S`: the clients' retries are
        left to the submission's own writes) is let through here (the hot standby to the legacy
        deployment must keep working); what needs it fails on its own."""
        try:
            async with asyncio.timeout(INFO_TIMEOUT_S):
                share = (await self.current()).share
        except (TimeoutError, RedisConnectionError, RedisTimeoutError):
            return
        try:
            if share is not None and self.shedding and share >= min(self.shedding.share, self.full_share):
                shedding = self._shed()
                if shedding and share >= self.full_share:
                    try:
                        await asyncio.wait_for(asyncio.shield(shedding), SHED_ROUND_S + 1)
                    except TimeoutError:
                        pass
                    share = (await self.current(fresh=True)).share
        except (RedisConnectionError, RedisTimeoutError):
            return
        if share is not None and share >= self.full_share:
            raise Unavailable(
                f"storage nearly full ({share:.0%} of Redis's maxmemory) and nothing left to shed (finished "
                "evaluations past the minimum retention are removed first): new submissions are refused "
                "until running work finishes and is cleaned up; try again later",
                headers={"Retry-After": "60"},
                retry_after=60,
                reason="storage_full",
            )

    def _shed(self) -> asyncio.Task[None] | None:
        """The shedding round under way in this process, or a new one; None while idle after
        a round that found nothing to shed."""
        if self._round is None or self._round.done():
            if time.monotonic() < self._idle_until:
                return None
            self._round = asyncio.create_task(self._shed_round())
        return self._round

    async def _shed_round(self) -> None:
        """Shed bounded steps until used memory is `SHED_MARGIN` below the shed line, nothing
        is left to shed, or `SHED_ROUND_S` passed. One process at a time (a lock in Redis):
        another one waits for the holder's round instead."""
        assert self.shedding is not None
        shedding, lock, token = self.shedding, self.shedding.store.keys.shed_lock, uuid.uuid4().hex
        deadline = time.monotonic() + SHED_ROUND_S
        removed = trimmed = freed = steps = 0
        before: float | None = None
        try:
            if not await self.client.set(lock, token, nx=True, px=SHED_LOCK_MS):
                await self._wait_for_holder(lock, deadline)
                return
            try:
                while time.monotonic() < deadline:
                    use = await memory_use(self.client)
                    before = use.share if before is None else before
                    if use.share is None or use.share < shedding.share - SHED_MARGIN:
                        break
                    step = await shedding.store.shed(shedding.min_retention_s, trim_bytes=shedding.trim_bytes)
                    steps += 1
                    removed, trimmed = removed + step.removed, trimmed + step.trimmed
                    freed += step.bytes_trimmed
                    if not step.progressed:
                        self._idle_until = time.monotonic() + SHED_IDLE_S
                        break
                    await self.client.pexpire(lock, SHED_LOCK_MS)
            finally:
                await self._release(keys=[lock], args=[token])
        except RedisError as exc:  # a full or missing Redis: the next submission tries again
            log.warning("storage.shed_failed", error=str(exc) or type(exc).__name__)
        finally:
            self._read_at = 0.0  # the next check reads memory afresh
            if steps:
                after = await _share_now(self.client)
                log.info("storage.shed", removed=removed, outputs_trimmed=trimmed, bytes_trimmed=freed,
                         steps=steps, used_share_before=before, used_share_after=after,
                         nothing_left=time.monotonic() < self._idle_until)  # fmt: skip

    async def _wait_for_holder(self, lock: str, deadline: float) -> None:
        """Another process is shedding: wait until its round ends (or ours would have)."""
        while time.monotonic() < deadline and await self.client.exists(lock):  # noqa: ASYNC110 (in Redis)
            await asyncio.sleep(0.05)


async def _share_now(client: aioredis.Redis) -> float | None:
    try:
        return (await memory_use(client)).share
    except RedisError:
        return None
