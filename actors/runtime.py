"""A worker process's runtime: the settings it was built with and the async resources its
actors and middleware share (one Redis pool, one HTTP client, the store, the executor pool).

`actors.worker.build_worker(settings)` makes one and hands it to the actors it declares and to
the middleware that forwards status changes, so nothing here reads the environment again and
nothing is process-wide. The resources are made lazily on Dramatiq's event-loop thread, the only
loop actors run on.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
import redis.asyncio as aioredis
import structlog
from dramatiq import Broker, Middleware, Worker
from dramatiq.asyncio import get_event_loop_thread

from actors.executor_client import ExecutorPool
from evaluations.store import EvaluationStore, StatusForwarder
from infra.outbound import AddressPolicy, guarded_client
from infra.redis_client import async_client_for
from infra.settings import Settings

log = structlog.get_logger(__name__)

#: How long a stopping worker waits for its clients to close their connections.
CLOSE_TIMEOUT_S = 5
#: How long a worker thread waits for the storage service to take a status change.
FORWARD_TIMEOUT_S = 30

F = TypeVar("F", bound=Callable[..., Any])


@dataclass
class Resources:
    redis: aioredis.Redis
    http: httpx.AsyncClient
    store: EvaluationStore
    executors: ExecutorPool
    #: for webhooks: only global addresses (or the operator's hosts), no redirects
    webhooks: httpx.AsyncClient

    async def close(self) -> None:
        try:
            await self.executors.close()
            await self.http.aclose()
            await self.webhooks.aclose()
        finally:
            await self.redis.aclose()


class WorkerRuntime:
    """What one worker (or one process sending actors' messages) runs with."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._resources: Resources | None = None

    def resources(self) -> Resources:
        """The clients; the first call (on the event loop) makes them."""
        if self._resources is None:
            s = self.settings
            client = async_client_for(s)
            http = httpx.AsyncClient(limits=httpx.Limits(max_keepalive_connections=32))
            forwarder = StatusForwarder(s.storage_url, http) if s.storage_url else None
            store = EvaluationStore(
                client, s.namespace, retention_seconds=s.retention_seconds, forwarder=forwarder
            )
            executors = ExecutorPool(s.executor_urls, s.executor_secret)
            webhooks = guarded_client(AddressPolicy(s.webhook_allow_hosts), s.webhook_timeout_s)
            self._resources = Resources(client, http, store, executors, webhooks)
        return self._resources

    def bind(self, fn: F) -> F:
        """`fn` with this runtime as its first argument, keeping its name (for Dramatiq's actor)."""
        return functools.update_wrapper(functools.partial(fn, self), fn)  # type: ignore[return-value]

    def close(self) -> None:
        """From the thread stopping the worker: close the clients on the event loop."""
        loop_thread = get_event_loop_thread()
        if self._resources is None or loop_thread is None:
            return
        closing, self._resources = self._resources, None
        try:
            asyncio.run_coroutine_threadsafe(closing.close(), loop_thread.loop).result(CLOSE_TIMEOUT_S)
        except Exception as exc:  # the process is exiting anyway; say why it was not clean
            log.warning("worker.close_failed", error=f"{type(exc).__name__}: {exc}")

    def forward_soon(self, eval_id: str) -> None:
        """From a worker thread: send the record's current status to the storage service.

        Used after middleware changed a status outside an actor (retry scheduled, dead-lettered,
        handed back); best effort, failures are logged.
        """
        loop_thread = get_event_loop_thread()
        if not self.settings.storage_url or loop_thread is None:
            return
        future = asyncio.run_coroutine_threadsafe(
            self.resources().store.forward_current(eval_id), loop_thread.loop
        )
        future.add_done_callback(functools.partial(_log_forward_failure, eval_id))

    def forward_now(self, eval_id: str, fields: dict[str, Any]) -> None:
        """From a worker thread: send a status change to the storage service and wait for it, so
        it arrives before any later one; a failure raises (the message is retried, as a storage
        failure in the actor would be)."""
        loop_thread = get_event_loop_thread()
        if not self.settings.storage_url or loop_thread is None:
            return

        async def send() -> None:
            forwarder = self.resources().store.forwarder
            if forwarder:
                await forwarder.send(eval_id, fields)

        asyncio.run_coroutine_threadsafe(send(), loop_thread.loop).result(timeout=FORWARD_TIMEOUT_S)


class CloseRuntime(Middleware):
    """Closes the runtime's clients on the event loop once its worker threads have stopped,
    before Dramatiq's AsyncIO stops that loop (after-hooks run in reverse order: list this one
    after AsyncIO), so keep-alive connections to executors and Redis end cleanly."""

    def __init__(self, runtime: WorkerRuntime) -> None:
        self.runtime = runtime

    def after_worker_shutdown(self, broker: Broker, worker: Worker) -> None:
        self.runtime.close()


def _log_forward_failure(eval_id: str, future: concurrent.futures.Future[None]) -> None:
    if not future.cancelled() and future.exception():
        log.warning("storage.forward_failed", eval_id=eval_id, error=str(future.exception()))
