"""Scheduled upkeep's functions: `crucible scheduler` (periodiq) sends them on their cron
schedules, which `actors.worker.build_worker` gives them when it declares them.

Each tick is enqueued once however many schedulers run (see `PriorityBroker.enqueue`), and
both actors are idempotent, so a redelivered or manually sent run does no harm. Each run is
recorded in `{ns}:scheduler:runs` (newest first) for the status page and the dashboard.
"""

from __future__ import annotations

import json
import time
from typing import Any

import structlog
from dramatiq.middleware import CurrentMessage

from actors.broker import AsyncEnqueuer
from actors.dlq import AsyncDeadLetterQueue
from actors.runtime import WorkerRuntime
from evaluations.queue import TICK_OPTION
from evaluations.redis_keys import RedisKeys
from middleware.state import worker_name

log = structlog.get_logger(__name__)

RUNS_KEPT = 200


async def _record_run(runtime: WorkerRuntime, actor: str, outcome: dict[str, Any]) -> None:
    message = CurrentMessage.get_current_message()
    tick = message.options.get(TICK_OPTION) if message else None
    run = {"actor": actor, "scheduled_at": tick, "at_ms": int(time.time() * 1000), "worker": worker_name(),
           **outcome}  # fmt: skip
    key = RedisKeys(runtime.settings.namespace).scheduler_runs
    async with runtime.resources().redis.pipeline(transaction=True) as pipe:
        pipe.lpush(key, json.dumps(run))
        pipe.ltrim(key, 0, RUNS_KEPT - 1)
        await pipe.execute()


def _dlq(runtime: WorkerRuntime) -> AsyncDeadLetterQueue:
    rt, settings = runtime.resources(), runtime.settings
    return AsyncDeadLetterQueue(
        rt.redis, settings.namespace, rt.store, warning_threshold=settings.dlq_warning_threshold
    )


async def cleanup_old_evaluations(runtime: WorkerRuntime) -> int:
    """Delete evaluations past the retention window (with their indexes and timelines),
    dead-letter entries older than `CRUCIBLE_DLQ_RETENTION_DAYS`, and bookkeeping of messages
    that no longer exist (AsyncEnqueuer.sweep_orphans). Idempotent."""
    rt, settings = runtime.resources(), runtime.settings
    removed = await rt.store.cleanup()
    dead = await _dlq(runtime).clear_old_tasks(days=settings.dlq_retention_days)
    orphans = await AsyncEnqueuer(rt.redis, settings.namespace).sweep_orphans()
    outcome = {"removed": removed, "dead_letters_removed": dead, "message_orphans_removed": orphans}
    log.info("cleanup.done", **outcome)
    await _record_run(runtime, "cleanup_old_evaluations", outcome)
    return removed


async def monitor_dead_letter_queue(runtime: WorkerRuntime) -> dict[str, Any]:
    """DLQ statistics; a warning in the log once it holds more than the threshold."""
    stats = await _dlq(runtime).get_statistics()
    if stats["over_threshold"]:
        log.warning("dlq.over_threshold", size=stats["queue_size"], threshold=stats["warning_threshold"])
    await _record_run(runtime, "monitor_dead_letter_queue", {"dead_letters": stats["queue_size"]})
    return stats
