"""The Celery wire: task messages that unchanged Celery producers send by name
(`send_task("tasks.evaluate_code", args=[eval_id, code, language], queue="evaluation")`) become
Crucible evaluations, and their results are written where `AsyncResult` reads them.

Run as `crucible celery-ingress` (`crucible up` starts one). Per message, oldest first, highest
level first: LMOVE it from the Celery queue's list to a list of our own (atomic: it is never in
neither), record the evaluation with the producer's eval_id and task id (as `POST /api/eval`
records one), then drop it from our list. A crash between the two leaves it in our list; the
next start records it again, and the eval_id already taken makes that a no-op: nothing is lost
and nothing runs twice. An unknown task name or a message that does not parse is dead-lettered
with its reason (the DLQ, `GET /api/dlq/tasks`) and counted, never dropped.

Revokes broadcast by the producers (`control.revoke(id, terminate=...)`) are carried out here
too (app/celery/control.py).

Each status change of such an evaluation writes `celery-task-meta-<task id>` as Celery's Redis
result backend does (evaluations/lua/status.lua): PENDING, STARTED, then SUCCESS with the
original worker's result shape, FAILURE or REVOKED. Where `CELERY_RESULT_BACKEND` names another
database or another Redis, the ingress also relays those records there (app/celery/results.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import signal
import time
from typing import Any

import structlog

from app.celery import control as celery_control
from app.celery.results import ResultRelay, relayed_backend
from app.services import Services
from app.submission_input import offered_languages, parse_submission
from evaluations.celery_wire import CeleryTask, decode, queue_lists, submission_body
from evaluations.errors import Conflict
from evaluations.queue import LEVEL_ALIASES, level_of_priority
from infra.settings import Settings

log = structlog.get_logger(__name__)

#: How long the ingress waits when every queue was empty.
IDLE_S = 0.05
#: How often the ingress says it runs, and how long that holds (`/health` reads it).
HEARTBEAT_S = 1.0
ALIVE_TTL_S = 5
#: How often what stays in the ingress's own lists is recorded again (see `run`).
RESTORE_EVERY_S = 60.0
#: How long a task id is known to stand for its evaluation (Celery keeps a result a day).
TASK_INDEX_S = 86400
#: How long the ingress waits after Redis failed it.
RETRY_AFTER_S = 1.0
#: Where a Celery producer's AsyncResult reads a task's state (Celery's RedisBackend).
RESULT_KEY_PREFIX = "celery-task-meta-"
SOURCE = "celery-wire"


class CeleryIngress:
    def __init__(self, services: Services, queues: tuple[str, ...]) -> None:
        self.services = services
        self.client = services.client
        self.keys = services.store.keys
        self.queues = queues
        self.languages = offered_languages(services.settings)
        #: the producers' result backend, when it is not this Redis database (its id)
        self.results_backend = relayed_backend(services.settings)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():  # Redis may not answer yet
            try:
                await self.restore()
                break
            except Exception as exc:
                log.warning("celery_wire.paused", error=str(exc))
                await asyncio.sleep(RETRY_AFTER_S)
        beat = restored = time.monotonic()
        while not stop.is_set():
            try:
                if time.monotonic() - beat >= HEARTBEAT_S:
                    await self.client.set(self.keys.celery_wire_alive, "1", ex=ALIVE_TTL_S)
                    beat = time.monotonic()
                if time.monotonic() - restored >= RESTORE_EVERY_S:
                    # one whose move's answer was lost (the client then moved another) waits
                    # in our list: recording it again is a no-op if it was recorded after all
                    await self.restore()
                    restored = time.monotonic()
                busy = await self.take_round()
            except Exception as exc:  # Redis away or full: what was taken stays ours
                log.warning("celery_wire.paused", error=str(exc))
                busy = False
                await asyncio.sleep(RETRY_AFTER_S)
                try:
                    await self.restore()
                except Exception as again:
                    log.warning("celery_wire.paused", error=str(again))
            if not busy:
                try:
                    await asyncio.wait_for(stop.wait(), IDLE_S)
                except TimeoutError:
                    pass

    async def restore(self) -> None:
        """Record what a crash left taken but not known to be recorded."""
        for queue in self.queues:
            for queue_list in queue_lists(queue):
                taken = self.keys.celery_wire_taken(queue_list)
                for raw in await self.client.lrange(taken, 0, -1):
                    await self.hand_over(raw, queue, taken)

    async def take_round(self) -> bool:
        """Take the oldest message of the highest non-empty queue; whether there was one."""
        for queue in self.queues:
            for queue_list in queue_lists(queue):
                taken = self.keys.celery_wire_taken(queue_list)
                raw = await self.client.lmove(queue_list, taken, "RIGHT", "LEFT")
                if raw is not None:
                    await self.hand_over(raw, queue, taken)
                    return True
        return False

    async def hand_over(self, raw: str | bytes, queue: str, taken: str) -> None:
        """Record the evaluation (or dead-letter the message), then drop it from `taken`."""
        outcome = await self.record(raw, queue)
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.hincrby(self.keys.celery_wire_counts, outcome, 1)
            pipe.lrem(taken, 1, raw)
            await pipe.execute()

    async def record(self, raw: str | bytes, queue: str) -> str:
        task: CeleryTask | None = None
        try:
            task = decode(raw, queue)
            body = submission_body(task)
            sub = parse_submission(body, self.services.settings, self.languages)
        except Exception as exc:  # whatever it is, it is not an evaluation we can run: say why
            await self.reject(raw, queue, task, exc)
            return "rejected"
        level = LEVEL_ALIASES.get(queue) or (
            level_of_priority(task.priority) if task.priority is not None else "default"
        )
        # its revokes name the task: which evaluation that is, kept as long as its result
        await self.client.set(self.keys.celery_wire_task(task.task_id), sub.eval_id, ex=TASK_INDEX_S)
        try:
            await self.services.submitter.submit(
                sub, level, SOURCE, system="dramatiq",
                celery_meta=RESULT_KEY_PREFIX + task.task_id, celery_results=self.results_backend,
            )  # fmt: skip
        except Conflict:
            log.info("celery_wire.already_recorded", eval_id=sub.eval_id, task_id=task.task_id)
            return "duplicate"
        revoked = await self.client.getdel(self.keys.celery_wire_revoked(task.task_id))
        if revoked is not None:  # revoked before it was taken: as Celery's worker, it never runs
            await self.services.canceller.cancel(sub.eval_id, revoked == "terminate")
        log.info("celery_wire.accepted", eval_id=sub.eval_id, task_id=task.task_id, queue=queue, level=level)
        return "accepted"

    async def reject(self, raw: str | bytes, queue: str, task: CeleryTask | None, exc: Exception) -> None:
        """Dead-letter a message Crucible cannot run, with the reason, where operators look."""
        text = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
        task_id = task.task_id if task else "celery-wire-" + hashlib.sha256(text.encode()).hexdigest()[:16]
        now = time.time()
        entry: dict[str, Any] = {
            "task_id": task_id,
            "task_name": task.name if task else "",
            "eval_id": str(task.args[0]) if task and task.args else "",
            "args": task.args if task else [],
            "kwargs": task.kwargs if task else {},
            "exception_class": type(exc).__name__,
            "exception_message": str(exc),
            "traceback": None,
            "retry_count": 0,
            "first_failure_time": now,
            "last_failure_time": now,
            "metadata": {"source": SOURCE, "queue": queue, "raw": text[:4000]},
        }
        await self.services.dlq.add_task(entry)
        last = {"last_rejected_at": str(now), "last_rejected_task": entry["task_name"],
                "last_rejected_reason": str(exc)[:500]}  # fmt: skip
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.hincrby(self.keys.celery_wire_counts, f"rejected:{type(exc).__name__}", 1)
            pipe.hset(self.keys.celery_wire_counts, mapping=last)
            await pipe.execute()
        log.warning("celery_wire.rejected", task_id=task_id, queue=queue, reason=str(exc))


async def serve(settings: Settings) -> None:
    """Run the ingress until SIGTERM or SIGINT."""
    services = Services.build(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    relay = ResultRelay.build(services.client, services.store.keys, settings)
    results = relay.shown_url if relay else "broker"
    log.info("celery_wire.started", queues=list(settings.celery_wire_queues), results=results)
    try:
        # subscribed before the first heartbeat: once /health says it runs, revokes reach it
        pubsub = await celery_control.subscribe(services)
        ingress = CeleryIngress(services, settings.celery_wire_queues)
        work = [ingress.run(stop), celery_control.listen(services, pubsub, stop)]
        if relay:
            work.append(relay.run(stop))
        await asyncio.gather(*work)
    finally:
        if relay:
            await relay.close()
        await services.close()
