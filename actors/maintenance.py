"""Scheduled upkeep: `crucible scheduler` (periodiq) sends these on their cron schedules.

Each tick is enqueued once however many schedulers run (see `PriorityBroker.enqueue`), and
both actors are idempotent, so a redelivered or manually sent run does no harm. Each run is
recorded in `{ns}:scheduler:runs` (newest first) for the status page and the dashboard.
"""

from __future__ import annotations

import json
import time
from typing import Any

import dramatiq
import structlog
from dramatiq.middleware import CurrentMessage
from periodiq import cron

from actors.broker import QUEUE_NAME, TICK_OPTION, AsyncEnqueuer
from actors.evaluate import broker
from actors.runtime import runtime
from app.config import get_settings
from app.dlq import AsyncDeadLetterQueue
from middleware.state import worker_name

log = structlog.get_logger(__name__)

RUNS_KEPT = 200
_settings = get_settings()
assert broker is not None  # the broker exists before actors are declared


async def _record_run(actor: str, outcome: dict[str, Any]) -> None:
    message = CurrentMessage.get_current_message()
    tick = message.options.get(TICK_OPTION) if message else None
    run = {"actor": actor, "scheduled_at": tick, "at_ms": int(time.time() * 1000), "worker": worker_name(),
           **outcome}  # fmt: skip
    key = f"{_settings.namespace}:scheduler:runs"
    async with runtime().redis.pipeline(transaction=True) as pipe:
        pipe.lpush(key, json.dumps(run))
        pipe.ltrim(key, 0, RUNS_KEPT - 1)
        await pipe.execute()


def _dlq() -> AsyncDeadLetterQueue:
    rt = runtime()
    return AsyncDeadLetterQueue(
        rt.redis, _settings.namespace, rt.store, warning_threshold=_settings.dlq_warning_threshold
    )


@dramatiq.actor(
    queue_name=QUEUE_NAME, queue_level="low", store_results=True, periodic=cron(_settings.cleanup_cron)
)
async def cleanup_old_evaluations() -> int:
    """Delete evaluations past the retention window (with their indexes and timelines),
    dead-letter entries older than `CRUCIBLE_DLQ_RETENTION_DAYS`, and bookkeeping of messages
    that no longer exist (AsyncEnqueuer.sweep_orphans). Idempotent."""
    rt = runtime()
    removed = await rt.store.cleanup()
    dead = await _dlq().clear_old_tasks(days=_settings.dlq_retention_days)
    orphans = await AsyncEnqueuer(rt.redis, _settings.namespace).sweep_orphans()
    outcome = {"removed": removed, "dead_letters_removed": dead, "message_orphans_removed": orphans}
    log.info("cleanup.done", **outcome)
    await _record_run("cleanup_old_evaluations", outcome)
    return removed


@dramatiq.actor(
    queue_name=QUEUE_NAME, queue_level="low", store_results=True, periodic=cron(_settings.dlq_monitor_cron)
)
async def monitor_dead_letter_queue() -> dict[str, Any]:
    """DLQ statistics; a warning in the log once it holds more than the threshold."""
    stats = await _dlq().get_statistics()
    if stats["over_threshold"]:
        log.warning("dlq.over_threshold", size=stats["queue_size"], threshold=stats["warning_threshold"])
    await _record_run("monitor_dead_letter_queue", {"dead_letters": stats["queue_size"]})
    return stats
