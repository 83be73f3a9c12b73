"""Accepting an evaluation: record it and hand it to Dramatiq.

Shared by the HTTP API and the Celery doors, so a submission is recorded the same way
whichever door it came in by. The record and the message commit in one Redis transaction, so
an accepted evaluation is never lost and never queued without its record. While migrating, a
`Route` handed to the `Submitter` (`app.migration.route.LegacyRoute`) may send a submission to
the legacy deployment instead, take it there when our Redis is down, and shadow it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

import redis.asyncio as aioredis
import structlog
from dramatiq.message import Message
from redis.asyncio.client import Pipeline
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.exceptions import WatchError

from actors.broker import AsyncEnqueuer
from evaluations.api_keys import ApiKey
from evaluations.errors import Conflict, InvalidInput, Refusal
from evaluations.queue import evaluation_message
from evaluations.quotas import Allowance, RateLimiter
from evaluations.status import TERMINAL
from evaluations.store import EvaluationStore, NewEvaluation
from evaluations.submission_spec import RunSpec
from evaluations.webhooks import Callback
from infra.outbound import AddressPolicy, BlockedAddress
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
    #: where its final result is POSTed (evaluations/webhooks.py), if anywhere
    callback: Callback | None = None

    def record(self, level: str, source: str, system: str, **extra: Any) -> NewEvaluation:
        """The record this submission starts, on `level` of `system`, from `source`."""
        run = self.run
        origin = {"source": source}
        if self.callback:
            extra = {**extra, "callback_url": self.callback.url, "callback_headers": self.callback.headers}
        return NewEvaluation(
            self.eval_id, run.code, run.language, run.timeout, level, self.priority, origin, system, **extra
        )

    @property
    def legacy_can_take(self) -> bool:
        """Whether the legacy deployment could run it: not with test cases or files, nor a
        webhook, which only Crucible sends."""
        return self.run.legacy_can_run and self.callback is None


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


class Route(Protocol):
    """Where submissions go besides Dramatiq (the legacy deployment, while migrating)."""

    async def choose(self) -> str:
        """The system for one new submission: "dramatiq" or "legacy"."""
        ...

    async def send(self, submitter: Submitter, sub: Submission, evaluation: NewEvaluation) -> Accepted:
        """Take a submission the split gave to the other system."""
        ...

    async def dramatiq_down(
        self, submitter: Submitter, error: Exception, sub: Submission, evaluation: NewEvaluation
    ) -> Accepted:
        """Take a submission our Redis could not; raise `error` when it cannot either."""
        ...

    async def accepted(self, submitter: Submitter, sub: Submission, level: str, accepted: Accepted) -> None:
        """Told of every accepted submission (to shadow a sample on the other system)."""
        ...


class Submitter:
    def __init__(
        self,
        client: aioredis.Redis,
        store: EvaluationStore,
        *,
        route: Route | None = None,
        limiter: RateLimiter | None = None,
        memory: MemoryGuard | None = None,
        outbound: AddressPolicy | None = None,
        min_replicas: int = 0,
        wait_ms: int = 500,
    ) -> None:
        """`min_replicas`: a submission is answered once that many Redis replicas have it (WAIT
        `wait_ms`), else 503 (`actors.broker.NotReplicated`)."""
        self.client = client
        self.memory = memory
        #: which webhook hosts may be reached (None: submissions with one are refused)
        self.outbound = outbound
        self.limiter = limiter
        self.store = store
        self.ns = store.ns
        self.enqueuer = AsyncEnqueuer(client, store.ns, min_replicas, wait_ms)
        self.route = route

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
        celery_results: str | None = None,
    ) -> Accepted:
        """Record and enqueue `sub` for `owner` (an API key id); `system` forces a system, else
        the route chooses. With `quota`, that key's quota counts it (429 when refused): on
        Dramatiq in the same Lua call as the record; else first, given back if sending fails.
        `counted`: the caller took its place already (a batch takes all at once). `celery_meta`:
        the Celery result key its changes are written to (a Celery producer's task), in the
        result backend `celery_results` names when that is not this Redis database."""
        if self.memory:
            await self.memory.check()
        if sub.callback:
            await self.check_callback(sub.callback, quota)
        # what the legacy deployment cannot run (cases, files, webhooks) stays here, unshadowed
        route = self.route if sub.legacy_can_take else None
        system = system or (await route.choose() if route else "dramatiq")
        evaluation = sub.record(
            level, source, system, owner=owner, max_running=self._max_running(quota),
            celery_meta=celery_meta, celery_results=celery_results,
        )  # fmt: skip
        apart = quota if quota and (counted or system == "legacy" or self.store.forwarder) else None
        allowance = await self._limiter.take(apart, [sub.eval_id]) if apart and not counted else None
        try:
            if route and system == "legacy":
                accepted = await route.send(self, sub, evaluation)
            else:
                accepted = await self._to_dramatiq_or_route(sub, evaluation, None if apart else quota, route)
        except Exception as exc:
            # a duplicate's place belongs to the evaluation already there, if it is in progress
            duplicate = isinstance(exc, Conflict)
            if apart and not (duplicate and await self._in_progress(sub.eval_id)):
                await self._limiter.release(apart, [sub.eval_id])
            raise
        if route:
            await route.accepted(self, sub, level, accepted)
        return replace(accepted, allowance=allowance) if allowance else accepted

    async def check_callback(self, callback: Callback, key: ApiKey | None) -> None:
        """422 naming `callback_url` when its host may not be reached (infra/outbound.py). The
        look-up costs `key` a read token first: a refused submission is not metered otherwise."""
        if self.outbound is None:
            raise InvalidInput("webhooks are not offered at this door", field="callback_url")
        if key is not None and self.limiter is not None:
            await self.limiter.take_reads(key)
        try:
            await self.outbound.check_url(callback.url)
        except BlockedAddress as exc:
            log.info("callback.refused_at_submission", url=callback.url, reason=str(exc), detail=exc.detail)
            raise InvalidInput(f"field 'callback_url' may not be used: {exc}", field="callback_url") from None

    async def _in_progress(self, eval_id: str) -> bool:
        record = await self.store.get(eval_id)
        return record is not None and record["status"] not in TERMINAL

    @property
    def _limiter(self) -> RateLimiter:
        assert self.limiter is not None, "a submission with a quota needs the Submitter's limiter"
        return self.limiter

    async def record(
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
                        raise duplicate()
                    if announce:
                        await self.store.announce(evaluation)
                    pipe.multi()
                    self.store.write_new(pipe, evaluation, count=count)
                    await add(pipe)
                    return await pipe.execute()
            except WatchError:
                continue
        raise duplicate()

    async def _to_dramatiq_or_route(
        self, sub: Submission, evaluation: NewEvaluation, quota: ApiKey | None, route: Route | None
    ) -> Accepted:
        try:
            return await self.to_dramatiq(sub, evaluation, quota)
        except (RedisConnectionError, RedisTimeoutError) as exc:
            if route is None:
                raise
            return await route.dramatiq_down(self, exc, sub, evaluation)

    async def to_dramatiq(
        self, sub: Submission, evaluation: NewEvaluation, quota: ApiKey | None = None
    ) -> Accepted:
        """Count `quota`, record and enqueue in one Lua call; the position counts ready messages
        ahead of it."""
        if self.store.forwarder:
            # the storage service hears of it before any worker can report it running
            if await self.client.exists(self.store.keys.record(sub.eval_id)):
                raise duplicate()
            await self.store.announce(evaluation)
        claim = self._limiter.claim(quota, sub.eval_id) if quota else ""
        record = self.store.keys.record(sub.eval_id)
        creation = self.store.creation(evaluation)
        reply = await self.enqueuer.submit(record, creation, message_of(sub), evaluation.level, claim)
        if reply == [-1]:
            raise duplicate()
        # 2: this very call, re-sent by the Redis client after a lost reply: the first one took it
        resent = int(reply[0]) == 2
        allowance = self._limiter.settle(quota, reply[:3]) if quota and not resent else None  # 429?
        log.info("evaluation.queued", eval_id=sub.eval_id, level=evaluation.level, language=sub.run.language)
        return Accepted(sub.eval_id, "dramatiq", max(int(reply[3]), 0), allowance=allowance)

    def _max_running(self, key: ApiKey | None) -> int:
        """How many of `key`'s evaluations may run at once (0: no cap)."""
        if key is None or self.limiter is None:
            return 0
        return int(self.limiter.limits[key.tier]["max_running"])


def message_of(sub: Submission) -> Message:
    return evaluation_message(sub.eval_id, sub.run)


def duplicate() -> Refusal:
    return Conflict("an evaluation with this eval_id exists", field="eval_id")
