"""Accepting an evaluation: record it and hand it to Dramatiq (or, while migrating, to Celery).

Shared by the HTTP API and the Celery compatibility layer, so a submission is recorded the
same way whichever door it came in by. On Dramatiq the record and the message commit in one
Redis transaction, so an accepted evaluation is never lost and never queued without its
record. If the chosen system cannot take it, the other one does (hot standby), and that is
counted in `{ns}:stats` as `fallback_to:<system>`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

import redis.asyncio as aioredis
import structlog
from dramatiq.message import Message
from redis.asyncio.client import Pipeline
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, WatchError
from redis.exceptions import TimeoutError as RedisTimeoutError

from actors.broker import AsyncEnqueuer
from app.migration.control import MigrationControl, other, shadow_id
from app.migration.legacy import LegacyCelery, LegacyUnavailable
from evaluations.api_keys import ApiKey
from evaluations.errors import Conflict, Refusal
from evaluations.queue import evaluation_message
from evaluations.quotas import Allowance, RateLimiter
from evaluations.status import TERMINAL
from evaluations.store import EvaluationStore, NewEvaluation
from evaluations.submission_spec import RunSpec
from infra.redis_memory import MemoryGuard

log = structlog.get_logger(__name__)

#: A submission whose WATCH keeps failing looks again this often before answering 409.
WATCH_ATTEMPTS = 3


@dataclass
class Submission:
    """A validated request to evaluate code: the run it asks for, under an id and a level."""

    eval_id: str
    run: RunSpec
    priority: bool = False
    #: the queue level: "high" when `priority`, else "default" unless a numeric priority said "low"
    level: str = "default"

    def record(self, level: str, source: str, system: str, **extra: Any) -> NewEvaluation:
        """The record this submission starts, on `level` of `system`, from `source`."""
        run = self.run
        origin = {"source": source}
        return NewEvaluation(
            self.eval_id, run.code, run.language, run.timeout, level, self.priority, origin, system, **extra
        )


@dataclass(frozen=True)
class Accepted:
    """Where a submission went."""

    eval_id: str
    queue_system: str
    #: ready messages ahead of it on Dramatiq (None on the legacy system)
    queue_position: int | None
    #: True when the chosen system failed and the other one took it
    fallback: bool = False
    #: what is left of the submitting key's quota, when it was counted (and Redis answered)
    allowance: Allowance | None = None


class Submitter:
    def __init__(
        self,
        client: aioredis.Redis,
        store: EvaluationStore,
        *,
        legacy: LegacyCelery | None = None,
        control: MigrationControl | None = None,
        limiter: RateLimiter | None = None,
        memory: MemoryGuard | None = None,
    ) -> None:
        self.client = client
        self.memory = memory
        self.limiter = limiter
        self.store = store
        self.ns = store.ns
        self.enqueuer = AsyncEnqueuer(client, store.ns)
        self.legacy = legacy
        self.control = control
        #: taken by the legacy deployment while our Redis was down; recorded once it is back
        self.unrecorded: dict[str, tuple[NewEvaluation, bool]] = {}
        self._shadows: set[asyncio.Task[None]] = set()

    async def submit(
        self,
        sub: Submission,
        level: str,
        source: str,
        *,
        system: str | None = None,
        owner: str | None = None,
        quota: ApiKey | None = None,
        counted: bool = False,
        celery_meta: str | None = None,
    ) -> Accepted:
        """Record and enqueue `sub` for `owner` (an API key id); `system` forces a route, else
        the split chooses. With `quota`, that key's quota counts it (429 when refused): on
        Dramatiq in the same Lua call as the record; else first, given back if sending fails.
        `counted`: the caller took its place already (a batch takes all at once). `celery_meta`:
        the Celery result key its changes are written to (a Celery producer's task)."""
        if self.memory:
            await self.memory.check()
        system = system or (await self.control.choose() if self.control else "dramatiq")
        evaluation = sub.record(
            level, source, system, owner=owner, max_running=self._max_running(quota), celery_meta=celery_meta
        )
        apart = quota if quota and (counted or system == "legacy" or self.store.forwarder) else None
        allowance = await self._limiter.take(apart, [sub.eval_id]) if apart and not counted else None
        try:
            if system == "legacy":
                accepted = await self._to_legacy(sub, evaluation)
            else:
                accepted = await self._to_dramatiq_or_legacy(sub, evaluation, None if apart else quota)
        except Exception as exc:
            # a duplicate's place belongs to the evaluation already there, if it is in progress
            duplicate = isinstance(exc, Conflict)
            if apart and not (duplicate and await self._in_progress(sub.eval_id)):
                await self._limiter.release(apart, [sub.eval_id])
            raise
        if self.control and await self.control.shadow_wanted():
            shadow = asyncio.create_task(self._shadow(sub, level, accepted.queue_system))
            self._shadows.add(shadow)  # runs after the answer; kept referenced until done
            shadow.add_done_callback(self._shadows.discard)
        return replace(accepted, allowance=allowance) if allowance else accepted

    async def _in_progress(self, eval_id: str) -> bool:
        record = await self.store.get(eval_id)
        return record is not None and record["status"] not in TERMINAL

    @property
    def _limiter(self) -> RateLimiter:
        assert self.limiter is not None, "a submission with a quota needs the Submitter's limiter"
        return self.limiter

    async def _record(
        self,
        evaluation: NewEvaluation,
        add: Callable[[Pipeline], Awaitable[None]],
        *,
        count: bool = True,
        announce: bool = True,
    ) -> list[Any]:
        """Write the new record and `add`'s commands in one MULTI; 409 if the eval_id exists.

        A WATCH failure means the key changed or the connection dropped: look again (a
        dropped connection then raises on the next WATCH, which callers treat as Redis down).
        """
        key = self.store.keys.record(evaluation.eval_id)
        for _ in range(WATCH_ATTEMPTS):
            try:
                async with self.client.pipeline(transaction=True) as pipe:
                    await pipe.watch(key)
                    if await pipe.exists(key):
                        raise _duplicate()
                    if announce:
                        await self.store.announce(evaluation)
                    pipe.multi()
                    self.store.write_new(pipe, evaluation, count=count)
                    await add(pipe)
                    return await pipe.execute()
            except WatchError:
                continue
        raise _duplicate()

    # -- Dramatiq ------------------------------------------------------------------------

    async def _to_dramatiq_or_legacy(
        self, sub: Submission, evaluation: NewEvaluation, quota: ApiKey | None = None
    ) -> Accepted:
        try:
            return await self._to_dramatiq(sub, evaluation, quota)
        except (RedisConnectionError, RedisTimeoutError) as exc:
            if self.legacy is None:
                raise
            log.warning("migration.dramatiq_unavailable", eval_id=sub.eval_id, error=str(exc))
            await self._send_or_raise(exc, evaluation)
            self._keep_unrecorded(replace(evaluation, queue_system="legacy"), fallback=True)
            return Accepted(sub.eval_id, "legacy", None, fallback=True)

    async def _to_dramatiq(
        self, sub: Submission, evaluation: NewEvaluation, quota: ApiKey | None = None
    ) -> Accepted:
        """Count `quota`, record and enqueue in one Lua call; the position counts ready messages
        ahead of it."""
        if self.store.forwarder:
            # the storage service hears of it before any worker can report it running
            if await self.client.exists(self.store.keys.record(sub.eval_id)):
                raise _duplicate()
            await self.store.announce(evaluation)
        claim = self._limiter.claim(quota, sub.eval_id) if quota else ""
        record = self.store.keys.record(sub.eval_id)
        creation = self.store.creation(evaluation)
        reply = await self.enqueuer.submit(record, creation, _message(sub), evaluation.level, claim)
        if reply == [-1]:
            raise _duplicate()
        # 2: this very call, re-sent by the Redis client after a lost reply: the first one took it
        resent = int(reply[0]) == 2
        allowance = self._limiter.settle(quota, reply[:3]) if quota and not resent else None  # 429?
        log.info("evaluation.queued", eval_id=sub.eval_id, level=evaluation.level, language=sub.run.language)
        return Accepted(sub.eval_id, "dramatiq", max(int(reply[3]), 0), allowance=allowance)

    # -- legacy Celery -------------------------------------------------------------------

    async def _to_legacy(
        self, sub: Submission, evaluation: NewEvaluation, take_over: bool = True
    ) -> Accepted:
        """Record first (tracked as legacy), then send; if sending fails, Dramatiq takes it
        (`take_over`), else LegacyUnavailable is raised."""
        if self.legacy is None:
            return await self._to_dramatiq(sub, evaluation)

        async def track(pipe: Pipeline) -> None:
            pipe.sadd(self.store.keys.legacy_pending, sub.eval_id)

        try:
            await self._record(evaluation, track, count=False)
        except (RedisConnectionError, RedisTimeoutError) as exc:
            # Our Redis is down but the legacy deployment is not: it still takes the work.
            await self._send_or_raise(exc, evaluation)
            self._keep_unrecorded(evaluation, fallback=False)
            return Accepted(sub.eval_id, "legacy", None)
        try:
            await self.legacy.send(sub.eval_id, sub.run.code, sub.run.language, evaluation.level)
        except LegacyUnavailable as exc:
            log.warning("migration.legacy_unavailable", eval_id=sub.eval_id, error=str(exc))
            if not take_over:
                raise
            position = await self._take_over_from_legacy(sub, evaluation)
            return Accepted(sub.eval_id, "dramatiq", position, fallback=True)
        if evaluation.shadow_of is None:
            await self.client.hincrby(self.store.keys.stats, "submitted:legacy", 1)
        log.info("evaluation.sent_to_legacy", eval_id=sub.eval_id, level=evaluation.level)
        return Accepted(sub.eval_id, "legacy", None)

    async def _send_or_raise(self, redis_error: Exception, evaluation: NewEvaluation) -> None:
        """Send to legacy while our Redis is down; if legacy fails too, the Redis error stands."""
        assert self.legacy is not None
        try:
            await self.legacy.send(evaluation.eval_id, evaluation.code, evaluation.language, evaluation.level)
        except LegacyUnavailable:
            raise redis_error from None

    async def _take_over_from_legacy(self, sub: Submission, evaluation: NewEvaluation) -> int:
        """Move a recorded legacy submission to Dramatiq in one transaction, and count it."""
        message = _message(sub)
        async with self.client.pipeline(transaction=True) as pipe:
            moved = {"queue_system": "dramatiq", "fallback": "1"}
            pipe.hset(self.store.keys.record(sub.eval_id), mapping=moved)
            pipe.srem(self.store.keys.legacy_pending, sub.eval_id)
            pipe.hincrby(self.store.keys.stats, "submitted:dramatiq", 1)
            pipe.hincrby(self.store.keys.stats, "fallback_to:dramatiq", 1)
            await self.enqueuer.enqueue_in(pipe, message, evaluation.level)
            self.enqueuer.queue_length_in(pipe, evaluation.level)
            *_, length = await pipe.execute()
        return max(int(length) - 1, 0)

    def _max_running(self, key: ApiKey | None) -> int:
        """How many of `key`'s evaluations may run at once (0: no cap)."""
        if key is None or self._limiter is None:
            return 0
        return int(self._limiter.limits[key.tier]["max_running"])

    def _keep_unrecorded(self, evaluation: NewEvaluation, fallback: bool) -> None:
        log.error("migration.legacy_unrecorded", eval_id=evaluation.eval_id, fallback=fallback)
        self.unrecorded[evaluation.eval_id] = (evaluation, fallback)

    async def record_unrecorded(self) -> int:
        """Record what legacy took while our Redis was down (the tracker calls this each tick).

        Stops at the first Redis error (still down); a record that exists meanwhile (a reply
        lost after a write that did happen) is left as it is. Returns how many were recorded.
        """
        recorded = 0
        for eval_id, (evaluation, fallback) in list(self.unrecorded.items()):

            async def track(pipe: Pipeline, fallback: bool = fallback, eval_id: str = eval_id) -> None:
                pipe.sadd(self.store.keys.legacy_pending, eval_id)
                pipe.hincrby(self.store.keys.stats, "submitted:legacy", 1)
                if fallback:
                    pipe.hset(self.store.keys.record(eval_id), "fallback", "1")
                    pipe.hincrby(self.store.keys.stats, "fallback_to:legacy", 1)

            try:
                await self._record(evaluation, track, count=False, announce=False)
                recorded += 1
            except Refusal:
                pass
            except RedisError:
                return recorded
            del self.unrecorded[eval_id]
        return recorded

    # -- shadow runs ---------------------------------------------------------------------

    async def _shadow(self, sub: Submission, level: str, primary_system: str) -> None:
        """Run a copy on the other system; the tracker compares the two outputs. Best effort:
        a copy the other system cannot take is dropped, never run twice on one system."""
        copy = replace(sub, eval_id=shadow_id(sub.eval_id))
        system = other(primary_system)
        evaluation = copy.record(level, "shadow", system, shadow_of=sub.eval_id)
        try:
            if system == "legacy":
                await self._to_legacy(copy, evaluation, take_over=False)
            else:
                await self._to_dramatiq(copy, evaluation)
            await self.client.sadd(self.store.keys.shadow_pending, sub.eval_id)
        except LegacyUnavailable:
            await self._forget(copy.eval_id)
        except (Refusal, RedisError) as exc:
            log.warning("migration.shadow_failed", eval_id=sub.eval_id, error=str(exc))

    async def _forget(self, eval_id: str) -> None:
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.srem(self.store.keys.legacy_pending, eval_id)
            await self.store.delete_in(pipe, eval_id)
            await pipe.execute()


def _message(sub: Submission) -> Message:
    return evaluation_message(sub.eval_id, sub.run)


def _duplicate() -> Refusal:
    return Conflict("an evaluation with this eval_id exists", field="eval_id")
