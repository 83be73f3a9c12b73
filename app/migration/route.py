"""The legacy route: how a `Submitter` sends work to the legacy Celery deployment while
migrating. Handed to the submitter only where a legacy deployment is configured.

The split (`MigrationControl`) chooses the system per submission. A submission for legacy is
recorded first (tracked as legacy), then sent; if sending fails, Dramatiq takes it. If our
Redis is down, legacy still takes work, and what it took is recorded once Redis is back. Either
way the fallback is counted in `{ns}:stats` as `fallback_to:<system>`. A sample is shadowed: a
copy runs on the other system and the tracker compares the outputs.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

import structlog
from redis.asyncio.client import Pipeline
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from app.migration.control import MigrationControl, other, shadow_id
from app.migration.legacy import LegacyCelery, LegacyUnavailable
from app.submission import Accepted, Submission, Submitter, message_of
from evaluations.errors import Refusal
from evaluations.store import NewEvaluation

log = structlog.get_logger(__name__)


class LegacyRoute:
    """A `Route` to the legacy deployment (see `app.submission.Route`)."""

    def __init__(self, legacy: LegacyCelery, control: MigrationControl) -> None:
        self.legacy = legacy
        self.control = control
        #: taken by the legacy deployment while our Redis was down; recorded once it is back
        self.unrecorded: dict[str, tuple[NewEvaluation, bool]] = {}
        self._shadows: set[asyncio.Task[None]] = set()

    async def choose(self) -> str:
        return await self.control.choose()

    async def send(
        self, submitter: Submitter, sub: Submission, evaluation: NewEvaluation, take_over: bool = True
    ) -> Accepted:
        """Record first (tracked as legacy), then send; if sending fails, Dramatiq takes it
        (`take_over`), else LegacyUnavailable is raised."""
        store = submitter.store

        async def track(pipe: Pipeline) -> None:
            pipe.sadd(store.keys.legacy_pending, sub.eval_id)

        try:
            await submitter.record(evaluation, track, count=False)
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
            position = await self._take_over(submitter, sub, evaluation)
            return Accepted(sub.eval_id, "dramatiq", position, fallback=True)
        if evaluation.shadow_of is None:
            await submitter.client.hincrby(store.keys.stats, "submitted:legacy", 1)
        log.info("evaluation.sent_to_legacy", eval_id=sub.eval_id, level=evaluation.level)
        return Accepted(sub.eval_id, "legacy", None)

    async def dramatiq_down(
        self, submitter: Submitter, error: Exception, sub: Submission, evaluation: NewEvaluation
    ) -> Accepted:
        log.warning("migration.dramatiq_unavailable", eval_id=sub.eval_id, error=str(error))
        await self._send_or_raise(error, evaluation)
        self._keep_unrecorded(replace(evaluation, queue_system="legacy"), fallback=True)
        return Accepted(sub.eval_id, "legacy", None, fallback=True)

    async def accepted(self, submitter: Submitter, sub: Submission, level: str, accepted: Accepted) -> None:
        if await self.control.shadow_wanted():
            shadow = asyncio.create_task(self._shadow(submitter, sub, level, accepted.queue_system))
            self._shadows.add(shadow)  # runs after the answer; kept referenced until done
            shadow.add_done_callback(self._shadows.discard)

    async def _send_or_raise(self, redis_error: Exception, evaluation: NewEvaluation) -> None:
        """Send to legacy while our Redis is down; if legacy fails too, the Redis error stands."""
        try:
            await self.legacy.send(evaluation.eval_id, evaluation.code, evaluation.language, evaluation.level)
        except LegacyUnavailable:
            raise redis_error from None

    async def _take_over(self, submitter: Submitter, sub: Submission, evaluation: NewEvaluation) -> int:
        """Move a recorded legacy submission to Dramatiq in one transaction, and count it."""
        keys, enqueuer = submitter.store.keys, submitter.enqueuer
        async with submitter.client.pipeline(transaction=True) as pipe:
            pipe.hset(keys.record(sub.eval_id), mapping={"queue_system": "dramatiq", "fallback": "1"})
            pipe.srem(keys.legacy_pending, sub.eval_id)
            pipe.hincrby(keys.stats, "submitted:dramatiq", 1)
            pipe.hincrby(keys.stats, "fallback_to:dramatiq", 1)
            await enqueuer.enqueue_in(pipe, message_of(sub), evaluation.level)
            enqueuer.queue_length_in(pipe, evaluation.level)
            *_, length = await pipe.execute()
        return max(int(length) - 1, 0)

    def _keep_unrecorded(self, evaluation: NewEvaluation, fallback: bool) -> None:
        log.error("migration.legacy_unrecorded", eval_id=evaluation.eval_id, fallback=fallback)
        self.unrecorded[evaluation.eval_id] = (evaluation, fallback)

    async def record_unrecorded(self, submitter: Submitter) -> int:
        """Record what legacy took while our Redis was down (the tracker calls this each tick).

        Stops at the first Redis error (still down); a record that exists meanwhile (a reply
        lost after a write that did happen) is left as it is. Returns how many were recorded.
        """
        keys = submitter.store.keys
        recorded = 0
        for eval_id, (evaluation, fallback) in list(self.unrecorded.items()):

            async def track(pipe: Pipeline, fallback: bool = fallback, eval_id: str = eval_id) -> None:
                pipe.sadd(keys.legacy_pending, eval_id)
                pipe.hincrby(keys.stats, "submitted:legacy", 1)
                if fallback:
                    pipe.hset(keys.record(eval_id), "fallback", "1")
                    pipe.hincrby(keys.stats, "fallback_to:legacy", 1)

            try:
                await submitter.record(evaluation, track, count=False, announce=False)
                recorded += 1
            except Refusal:
                pass
            except RedisError:
                return recorded
            del self.unrecorded[eval_id]
        return recorded

    async def _shadow(self, submitter: Submitter, sub: Submission, level: str, primary_system: str) -> None:
        """Run a copy on the other system; the tracker compares the two outputs. Best effort:
        a copy the other system cannot take is dropped, never run twice on one system."""
        copy = replace(sub, eval_id=shadow_id(sub.eval_id))
        system = other(primary_system)
        evaluation = copy.record(level, "shadow", system, shadow_of=sub.eval_id)
        try:
            if system == "legacy":
                await self.send(submitter, copy, evaluation, take_over=False)
            else:
                await submitter.to_dramatiq(copy, evaluation)
            await submitter.client.sadd(submitter.store.keys.shadow_pending, sub.eval_id)
        except LegacyUnavailable:
            await self._forget(submitter, copy.eval_id)
        except (Refusal, RedisError) as exc:
            log.warning("migration.shadow_failed", eval_id=sub.eval_id, error=str(exc))

    async def _forget(self, submitter: Submitter, eval_id: str) -> None:
        async with submitter.client.pipeline(transaction=True) as pipe:
            pipe.srem(submitter.store.keys.legacy_pending, eval_id)
            await submitter.store.delete_in(pipe, eval_id)
            await pipe.execute()
