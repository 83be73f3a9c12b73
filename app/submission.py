"""Accepting an evaluation: record it and hand it to Dramatiq (or, while migrating, to Celery).

Shared by the HTTP API and the Celery compatibility layer, so a submission is recorded the
same way whichever door it came in by. On Dramatiq the record and the message commit in one
Redis transaction, so an accepted evaluation is never lost and never queued without its
record. If the chosen system cannot take it, the other one does (hot standby), and that is
counted in `{ns}:stats` as `fallback_to:<system>`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import redis.asyncio as aioredis
import structlog
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, WatchError
from redis.exceptions import TimeoutError as RedisTimeoutError

from actors.broker import AsyncEnqueuer
from actors.evaluate import evaluation_message
from app.config import LEVELS
from app.errors import RequestError
from app.legacy import LegacyCelery, LegacyUnavailable
from app.migration import MigrationControl, legacy_pending_key, other, shadow_id, shadow_pending_key
from app.store import EvaluationStore, NewEvaluation

log = structlog.get_logger(__name__)


@dataclass
class Submission:
    """A validated request to evaluate code."""

    eval_id: str
    code: str
    language: str
    timeout: float
    priority: bool = False
    stdin: str | None = None
    args: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Accepted:
    """Where a submission went."""

    eval_id: str
    queue_system: str
    #: ready messages ahead of it on Dramatiq (None on the legacy system)
    queue_position: int | None
    #: True when the chosen system failed and the other one took it
    fallback: bool = False


class Submitter:
    def __init__(
        self,
        client: aioredis.Redis,
        store: EvaluationStore,
        *,
        legacy: LegacyCelery | None = None,
        control: MigrationControl | None = None,
    ) -> None:
        self.client = client
        self.store = store
        self.ns = store.ns
        self.enqueuer = AsyncEnqueuer(client, store.ns)
        self.legacy = legacy
        self.control = control

    async def submit(
        self, sub: Submission, level: str, source: str, *, system: str | None = None
    ) -> Accepted:
        """Record and enqueue `sub`; `system` forces a route, else the split chooses."""
        system = system or (await self.control.choose() if self.control else "dramatiq")
        evaluation = self._evaluation(sub, level, source, system)
        if system == "legacy":
            accepted = await self._to_legacy(sub, evaluation)
        else:
            accepted = await self._to_dramatiq_or_legacy(sub, evaluation)
        if self.control and source != "shadow" and await self.control.shadow_wanted():
            await self._shadow(sub, level, accepted.queue_system)
        return accepted

    def _evaluation(self, sub: Submission, level: str, source: str, system: str) -> NewEvaluation:
        metadata: dict[str, Any] = {"source": source}
        return NewEvaluation(
            sub.eval_id, sub.code, sub.language, sub.timeout, level, sub.priority, metadata, system
        )

    # -- Dramatiq ------------------------------------------------------------------------

    async def _to_dramatiq_or_legacy(self, sub: Submission, evaluation: NewEvaluation) -> Accepted:
        try:
            return await self._to_dramatiq(sub, evaluation)
        except (RedisConnectionError, RedisTimeoutError) as exc:
            if self.legacy is None:
                raise
            log.warning("migration.dramatiq_unavailable", eval_id=sub.eval_id, error=str(exc))
            try:
                await self.legacy.send(sub.eval_id, sub.code, sub.language, evaluation.level)
            except LegacyUnavailable:
                raise exc from None
            await self._record_legacy_fallback(replace(evaluation, queue_system="legacy"))
            return Accepted(sub.eval_id, "legacy", None, fallback=True)

    async def _to_dramatiq(self, sub: Submission, evaluation: NewEvaluation) -> Accepted:
        """Record and enqueue atomically; the position counts ready messages ahead of it."""
        record_key = self.store.key(sub.eval_id)
        message = evaluation_message(sub.eval_id, sub.code, sub.language, sub.timeout, sub.stdin, sub.args)
        level = evaluation.level
        try:
            async with self.client.pipeline(transaction=True) as pipe:
                await pipe.watch(record_key)
                if await pipe.exists(record_key):
                    raise _duplicate()
                await self.store.announce(evaluation)
                pipe.multi()
                self.store.write_new(pipe, evaluation)
                await self.enqueuer.enqueue_in(pipe, message, level)
                for lvl in LEVELS[: LEVELS.index(level) + 1]:
                    pipe.llen(f"{self.ns}:queue:{lvl}")
                results = await pipe.execute()
        except WatchError:
            raise _duplicate() from None
        ahead = sum(results[-(LEVELS.index(level) + 1) :]) - 1
        log.info("evaluation.queued", eval_id=sub.eval_id, level=level, language=sub.language)
        return Accepted(sub.eval_id, "dramatiq", max(ahead, 0))

    # -- legacy Celery -------------------------------------------------------------------

    async def _to_legacy(self, sub: Submission, evaluation: NewEvaluation) -> Accepted:
        """Record first (tracked as legacy), then send; if sending fails, Dramatiq takes it."""
        if self.legacy is None:
            return await self._to_dramatiq(sub, evaluation)
        record_key = self.store.key(sub.eval_id)
        try:
            async with self.client.pipeline(transaction=True) as pipe:
                await pipe.watch(record_key)
                if await pipe.exists(record_key):
                    raise _duplicate()
                await self.store.announce(evaluation)
                pipe.multi()
                self.store.write_new(pipe, evaluation)
                pipe.sadd(legacy_pending_key(self.ns), sub.eval_id)
                await pipe.execute()
        except WatchError:
            raise _duplicate() from None
        except (RedisConnectionError, RedisTimeoutError) as exc:
            # Our Redis is down but the legacy deployment is not: it still takes the work.
            try:
                await self.legacy.send(sub.eval_id, sub.code, sub.language, evaluation.level)
            except LegacyUnavailable:
                raise exc from None
            log.error("migration.legacy_unrecorded", eval_id=sub.eval_id, error=str(exc))
            return Accepted(sub.eval_id, "legacy", None)
        try:
            await self.legacy.send(sub.eval_id, sub.code, sub.language, evaluation.level)
        except LegacyUnavailable as exc:
            log.warning("migration.legacy_unavailable", eval_id=sub.eval_id, error=str(exc))
            position = await self._take_over_from_legacy(sub, evaluation.level)
            return Accepted(sub.eval_id, "dramatiq", position, fallback=True)
        log.info("evaluation.sent_to_legacy", eval_id=sub.eval_id, level=evaluation.level)
        return Accepted(sub.eval_id, "legacy", None)

    async def _take_over_from_legacy(self, sub: Submission, level: str) -> int:
        """Move a recorded legacy submission to Dramatiq in one transaction, and count it."""
        message = evaluation_message(sub.eval_id, sub.code, sub.language, sub.timeout, sub.stdin, sub.args)
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.hset(self.store.key(sub.eval_id), mapping={"queue_system": "dramatiq", "fallback": "1"})
            pipe.srem(legacy_pending_key(self.ns), sub.eval_id)
            pipe.hincrby(self.store.stats_key, "submitted:legacy", -1)
            pipe.hincrby(self.store.stats_key, "submitted:dramatiq", 1)
            pipe.hincrby(self.store.stats_key, "fallback_to:dramatiq", 1)
            await self.enqueuer.enqueue_in(pipe, message, level)
            pipe.llen(f"{self.ns}:queue:{level}")
            *_, length = await pipe.execute()
        return max(int(length) - 1, 0)

    async def _record_legacy_fallback(self, evaluation: NewEvaluation) -> None:
        """Our Redis failed, so legacy took it: record it if Redis answers again, else log it."""
        try:
            async with self.client.pipeline(transaction=True) as pipe:
                self.store.write_new(pipe, evaluation)
                pipe.hset(self.store.key(evaluation.eval_id), "fallback", "1")
                pipe.sadd(legacy_pending_key(self.ns), evaluation.eval_id)
                pipe.hincrby(self.store.stats_key, "fallback_to:legacy", 1)
                await pipe.execute()
        except RedisError as exc:
            log.error("migration.fallback_unrecorded", eval_id=evaluation.eval_id, error=str(exc))

    # -- shadow runs ---------------------------------------------------------------------

    async def _shadow(self, sub: Submission, level: str, primary_system: str) -> None:
        """Run a copy on the other system; the tracker compares the two outputs. Best effort."""
        copy = replace(sub, eval_id=shadow_id(sub.eval_id))
        try:
            evaluation = self._evaluation(copy, level, "shadow", other(primary_system))
            evaluation.metadata["shadow_of"] = sub.eval_id
            if evaluation.queue_system == "legacy":
                accepted = await self._to_legacy(copy, evaluation)
            else:
                accepted = await self._to_dramatiq(copy, evaluation)
            if accepted.queue_system != primary_system:
                await self.client.sadd(shadow_pending_key(self.ns), sub.eval_id)
        except (RequestError, RedisError) as exc:
            log.warning("migration.shadow_failed", eval_id=sub.eval_id, error=str(exc))


def _duplicate() -> RequestError:
    return RequestError(409, "an evaluation with this eval_id exists", field="eval_id")
