"""Per-process async resources of a worker: one Redis pool and one HTTP client, made once.

They are created lazily on Dramatiq's event-loop thread, the only loop actors run on.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from dataclasses import dataclass
from functools import partial
from typing import Any

import httpx
import redis.asyncio as aioredis
import structlog
from dramatiq import Broker, Middleware, Worker
from dramatiq.asyncio import get_event_loop_thread

from actors.executor_client import ExecutorPool
from evaluations.store import EvaluationStore, StatusForwarder
from infra.redis_client import async_client
from infra.settings import get_settings

log = structlog.get_logger(__name__)


@dataclass
class Runtime:
    redis: aioredis.Redis
    http: httpx.AsyncClient
    store: EvaluationStore
    executors: ExecutorPool

    async def close(self) -> None:
        try:
            await self.executors.close()
            await self.http.aclose()
        finally:
            await self.redis.aclose()


_runtime: Runtime | None = None


def runtime() -> Runtime:
    """The process's resources; the first call (on the event loop) creates them."""
    global _runtime
    if _runtime is None:
        settings = get_settings()
        client = async_client(settings.redis_url_or_default)
        http = httpx.AsyncClient(limits=httpx.Limits(max_keepalive_connections=32))
        forwarder = StatusForwarder(settings.storage_url, http) if settings.storage_url else None
        store = EvaluationStore(
            client, settings.namespace, retention_seconds=settings.retention_seconds, forwarder=forwarder
        )
        executors = ExecutorPool(settings.executor_urls, settings.executor_secret)
        _runtime = Runtime(client, http, store, executors)
    return _runtime


#: How long a stopping worker waits for its clients to close their connections.
CLOSE_TIMEOUT_S = 5


class CloseRuntime(Middleware):
    """Closes the process's clients on the event loop once its worker threads have stopped,
    before Dramatiq's AsyncIO stops that loop (after-hooks run in reverse order: list this one
    after AsyncIO), so keep-alive connections to executors and Redis end cleanly."""

    def after_worker_shutdown(self, broker: Broker, worker: Worker) -> None:
        global _runtime
        loop_thread = get_event_loop_thread()
        if _runtime is None or loop_thread is None:
            return
        closing, _runtime = _runtime, None
        try:
            asyncio.run_coroutine_threadsafe(closing.close(), loop_thread.loop).result(CLOSE_TIMEOUT_S)
        except Exception as exc:  # the process is exiting anyway; say why it was not clean
            log.warning("worker.close_failed", error=f"{type(exc).__name__}: {exc}")


#: How long a worker thread waits for the storage service to take a status change.
FORWARD_TIMEOUT_S = 30


def forward_soon(eval_id: str) -> None:
    """From a worker thread: send the record's current status to the storage service.

    Used after middleware changed a status outside an actor (retry scheduled, dead-lettered,
    handed back); best effort, failures are logged.
    """
    if not get_settings().storage_url:
        return
    loop_thread = get_event_loop_thread()
    if loop_thread is None:
        return
    future = asyncio.run_coroutine_threadsafe(runtime().store.forward_current(eval_id), loop_thread.loop)
    future.add_done_callback(partial(_log_forward_failure, eval_id))


def forward_now(eval_id: str, fields: dict[str, Any]) -> None:
    """From a worker thread: send a status change to the storage service and wait for it, so
    it arrives before any later one; a failure raises (the message is retried, as a storage
    failure in the actor would be)."""
    if not get_settings().storage_url:
        return
    loop_thread = get_event_loop_thread()
    if loop_thread is None:
        return

    async def send() -> None:
        forwarder = runtime().store.forwarder
        if forwarder:
            await forwarder.send(eval_id, fields)

    asyncio.run_coroutine_threadsafe(send(), loop_thread.loop).result(timeout=FORWARD_TIMEOUT_S)


def _log_forward_failure(eval_id: str, future: concurrent.futures.Future[None]) -> None:
    if not future.cancelled() and future.exception():
        log.warning("storage.forward_failed", eval_id=eval_id, error=str(future.exception()))
