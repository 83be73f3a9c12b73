"""A worker process's entry point: builds the broker with its middleware stack from the
settings, sets Dramatiq's globals (broker, message encoder) and declares the actors with
their options (levels, time limits, cron schedules). Nothing of it happens at import time.

`crucible worker` runs Dramatiq's CLI and `crucible scheduler` periodiq, both on
`actors.worker:main`; the Celery shim calls `process_worker()` when it first sends an actor.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache, partial
from typing import Any

import dramatiq
from dramatiq.middleware import AsyncIO, CurrentMessage, ShutdownNotifications, TimeLimit
from dramatiq.results import Results
from dramatiq.results.backends import RedisBackend
from periodiq import PeriodiqMiddleware, cron

from actors import callbacks, evaluate, maintenance
from actors.broker import PriorityBroker
from actors.runtime import CloseRuntime, WorkerRuntime
from evaluations.languages import wall_limit
from evaluations.queue import ENCODER, EVALUATE_ACTOR, HEALTH_CHECK_ACTOR, QUEUE_NAME, actor_time_limit_ms
from evaluations.redis_keys import RedisKeys
from infra.logs import configure_logging
from infra.redis_client import sync_client_for
from infra.settings import Settings, get_settings
from middleware.backoff import Backoff
from middleware.dead_letter import DeadLetters
from middleware.gc_for_serving import TuneGcForServing
from middleware.priority import PriorityRouting
from middleware.running import RECORDS_STATUS, MarkRunning
from middleware.worker_stats import WorkerStats


def result_backend(settings: Settings) -> RedisBackend:
    return RedisBackend(
        client=sync_client_for(settings),
        namespace=RedisKeys(settings.namespace).results,
        encoder=ENCODER,
    )


def build_broker(settings: Settings, runtime: WorkerRuntime) -> PriorityBroker:
    """The broker with Crucible's middleware stack over `runtime` (no actors, no globals set)."""
    broker = PriorityBroker(
        url=settings.redis_url_or_default,
        client=sync_client_for(settings),
        min_replicas=settings.redis_min_replicas,
        wait_ms=settings.redis_wait_ms,
        namespace=settings.namespace,
        levels=settings.worker_levels,
        heartbeat_interval_ms=settings.heartbeat_interval_ms,
        heartbeat_timeout_ms=settings.heartbeat_timeout_ms,
        middleware=[
            # First, so its after-hooks run last (Dramatiq calls them in reverse order) and see
            # what Backoff decided about each message.
            WorkerStats(policies=settings.retry_policies),
            TuneGcForServing(),
            AsyncIO(),
            CloseRuntime(runtime),
            CurrentMessage(),
            PriorityRouting(),
            TimeLimit(),
            # Interrupt running actors on SIGTERM so Backoff hands their messages back at once.
            ShutdownNotifications(notify_shutdown=True),
            DeadLetters(on_status_change=runtime.forward_soon),
            Backoff(on_status_change=runtime.forward_soon, policies=settings.retry_policies),
            # Turns finished evaluations' due webhooks into delivery messages (a thread).
            callbacks.CallbackRelay(partial(sync_client_for, settings), settings.namespace),
            # Last of the before-hooks that may refuse a message: marks the evaluation running.
            MarkRunning(forward=runtime.forward_now, on_skip=runtime.forward_soon),
            # Return values of actors declared with store_results (health_check...), for
            # the Celery shim's `.get()`; evaluations keep their results in their records.
            Results(backend=result_backend(settings)),
            # periodiq drops a tick not started within 30 s by default, so a busy queue would
            # skip cleanup every time; ours are idempotent, so a late tick still runs.
            PeriodiqMiddleware(skip_delay=settings.tick_skip_after_s),
        ],
    )
    return broker


Actor = dramatiq.Actor[Any, Any]


@dataclass(frozen=True)
class DeclaredActors:
    """The broker, the runtime its actors share and the actors declared on it."""

    broker: PriorityBroker
    runtime: WorkerRuntime
    evaluate_code: Actor
    health_check: Actor
    cleanup_old_evaluations: Actor
    monitor_dead_letter_queue: Actor
    deliver_callback: Actor


def declare_actors(broker: PriorityBroker, runtime: WorkerRuntime) -> DeclaredActors:
    """Declare every actor on `broker`, bound to `runtime`, each with its level, time limit or
    schedule."""
    settings = runtime.settings
    time_limit = actor_time_limit_ms(wall_limit(settings.max_timeout))
    return DeclaredActors(
        broker=broker,
        runtime=runtime,
        evaluate_code=dramatiq.actor(
            runtime.bind(evaluate.evaluate_code), broker=broker, actor_name=EVALUATE_ACTOR,
            queue_name=QUEUE_NAME, time_limit=time_limit, **{RECORDS_STATUS: True},
        ),
        health_check=dramatiq.actor(
            evaluate.health_check, broker=broker, actor_name=HEALTH_CHECK_ACTOR, queue_name=QUEUE_NAME,
            queue_level="high", store_results=True,
        ),
        cleanup_old_evaluations=dramatiq.actor(
            runtime.bind(maintenance.cleanup_old_evaluations), broker=broker, queue_name=QUEUE_NAME,
            queue_level="low", store_results=True, periodic=cron(settings.cleanup_cron),
        ),
        monitor_dead_letter_queue=dramatiq.actor(
            runtime.bind(maintenance.monitor_dead_letter_queue), broker=broker, queue_name=QUEUE_NAME,
            queue_level="low", store_results=True, periodic=cron(settings.dlq_monitor_cron),
        ),
        # high: a delivery is short (bounded by CRUCIBLE_WEBHOOK_TIMEOUT_S) and should not wait
        # behind a backlog of runs
        deliver_callback=dramatiq.actor(
            runtime.bind(callbacks.deliver_callback), broker=broker, actor_name=callbacks.CALLBACK_ACTOR,
            queue_name=QUEUE_NAME, queue_level="high", retry_policy=callbacks.POLICY,
            time_limit=int((settings.webhook_timeout_s + 30) * 1000),
        ),
    )  # fmt: skip


def build_worker(settings: Settings) -> DeclaredActors:
    """Everything a worker (or a process sending actors' messages) needs, made Dramatiq's globals."""
    configure_logging(settings.log_level, settings.log_format)
    runtime = WorkerRuntime(settings)
    broker = build_broker(settings, runtime)
    dramatiq.set_encoder(ENCODER)
    dramatiq.set_broker(broker)
    return declare_actors(broker, runtime)


@cache
def process_worker() -> DeclaredActors:
    """This process's worker, built once from the environment."""
    return build_worker(get_settings())


def main() -> None:
    """For Dramatiq's CLI and periodiq (`actors.worker:main`): they then take the global broker."""
    process_worker()
