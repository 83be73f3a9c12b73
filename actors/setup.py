"""Builds the process's Dramatiq broker from the settings and makes it the global one."""

from __future__ import annotations

from functools import cache

import dramatiq
from dramatiq.middleware import AsyncIO, CurrentMessage, ShutdownNotifications, TimeLimit
from dramatiq.results import Results
from dramatiq.results.backends import RedisBackend
from periodiq import PeriodiqMiddleware

from actors.broker import PriorityBroker
from actors.runtime import CloseRuntime, forward_now, forward_soon
from app.config import Settings, get_settings
from app.logs import configure_logging
from app.redis_client import sync_client
from middleware.backoff import Backoff
from middleware.collector import CollectorForServing
from middleware.dead_letter import DeadLetters
from middleware.priority import PriorityRouting
from middleware.retry_policy import apply_overrides
from middleware.running import MarkRunning
from middleware.worker_stats import WorkerStats


def result_backend(settings: Settings) -> RedisBackend:
    return RedisBackend(
        client=sync_client(settings.redis_url_or_default), namespace=f"{settings.namespace}:results"
    )


def build_broker(settings: Settings) -> PriorityBroker:
    apply_overrides(settings.retry_overrides)
    broker = PriorityBroker(
        url=settings.redis_url_or_default,
        namespace=settings.namespace,
        levels=settings.worker_levels,
        heartbeat_interval_ms=settings.heartbeat_interval_ms,
        heartbeat_timeout_ms=settings.heartbeat_timeout_ms,
        middleware=[
            # First, so its after-hooks run last (Dramatiq calls them in reverse order) and see
            # what Backoff decided about each message.
            WorkerStats(),
            CollectorForServing(),
            AsyncIO(),
            CloseRuntime(),
            CurrentMessage(),
            PriorityRouting(),
            TimeLimit(),
            # Interrupt running actors on SIGTERM so Backoff hands their messages back at once.
            ShutdownNotifications(notify_shutdown=True),
            DeadLetters(on_status_change=forward_soon),
            Backoff(on_status_change=forward_soon),
            # Last of the before-hooks that may refuse a message: marks the evaluation running.
            MarkRunning(forward=forward_now, on_skip=forward_soon),
            # Return values of actors declared with store_results (health_check...), for
            # the Celery shim's `.get()`; evaluations keep their results in their records.
            Results(backend=result_backend(settings)),
            # periodiq drops a tick not started within 30 s by default, so a busy queue would
            # skip cleanup every time; ours are idempotent, so a late tick still runs.
            PeriodiqMiddleware(skip_delay=settings.tick_skip_after_s),
        ],
    )
    dramatiq.set_broker(broker)
    return broker


@cache
def process_broker() -> PriorityBroker:
    """The broker of this process, built once from the environment (with logging set up)."""
    settings = get_settings()
    configure_logging(settings.log_level, settings.log_format)
    return build_broker(settings)
