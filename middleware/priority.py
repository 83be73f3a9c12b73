"""Priority routing: which level a message goes to, and how much a worker may fetch."""

from __future__ import annotations

from typing import Any

from dramatiq.middleware import Middleware, MiddlewareError

from evaluations.queue import LEVEL_OPTION, LEVELS


class UnknownLevel(MiddlewareError, ValueError):
    """An actor names a level that does not exist (raised at declaration, not at run time)."""


class PriorityRouting(Middleware):
    """Declares the `queue_level` actor option and sizes each worker's fetches.

    A worker may hold no more messages than it has threads: anything prefetched beyond
    that would wait in memory while a higher-priority message waits in Redis.
    """

    @property
    def actor_options(self) -> set[str]:
        return {LEVEL_OPTION}

    def before_declare_actor(self, broker: Any, actor: Any) -> None:
        level = actor.options.get(LEVEL_OPTION, "default")
        if level not in LEVELS:
            raise UnknownLevel(f"actor {actor.actor_name}: queue_level must be one of {LEVELS}")

    def before_worker_boot(self, broker: Any, worker: Any) -> None:
        broker.fetch_slots = worker.worker_threads
