"""The legacy Celery deployment, seen from this service while traffic moves over.

Submissions go to it with the real Celery client (the optional extra `crucible[legacy]`),
as the old API sent them: task `tasks.evaluate_code(eval_id, code, language)`, task id
`celery-{eval_id}`, queue `high_priority` or `evaluation`. Its results are read from its
Redis result backend (the key Celery's backend names, JSON) with the async Redis client, so
reading never blocks the event loop; sending and revoking use Celery's blocking client on a
small thread pool of their own.
"""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any

import redis.asyncio as aioredis

from evaluations.errors import Unavailable
from evaluations.queue import task_id_of
from infra.redis_client import async_client

#: Our levels → the legacy deployment's queues (it had no worker on a separate low queue).
LEGACY_QUEUES = {"high": "high_priority", "default": "evaluation", "low": "evaluation"}
LEGACY_TASK = "tasks.evaluate_code"
#: Sending gives up quickly when the legacy broker is down, so the fallback is quick too.
SEND_RETRY_POLICY = {"max_retries": 1, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.2}
SOCKET_TIMEOUT_S = 2
BREAKER_S = 5.0


class LegacyUnavailable(Unavailable):
    """The legacy deployment could not take a submission (not installed, broker down)."""


@dataclass(frozen=True)
class LegacyState:
    """One task's state as the legacy result backend has it."""

    state: str
    result: Any
    traceback: str | None
    done_ms: int | None

    @classmethod
    def from_meta(cls, raw: str | bytes) -> LegacyState:
        meta = json.loads(raw)
        done_ms = None
        if done := meta.get("date_done"):
            at = datetime.fromisoformat(done)
            done_ms = int((at if at.tzinfo else at.replace(tzinfo=UTC)).timestamp() * 1000)  # Celery: UTC
        return cls(meta.get("status", "PENDING"), meta.get("result"), meta.get("traceback"), done_ms)

    def error_text(self) -> str:
        """A failure's exception as 'Class: message', from Celery's JSON exception encoding."""
        if isinstance(self.result, dict) and "exc_type" in self.result:
            message = self.result.get("exc_message")
            text = " ".join(map(str, message)) if isinstance(message, list) else str(message or "")
            return f"{self.result['exc_type']}: {text}".rstrip(": ")
        return "" if self.result is None else str(self.result)


class LegacyCelery:
    """Client of the legacy Celery deployment: send, read states, revoke.

    The sending app has no result backend: Celery would otherwise subscribe to the result
    before each send and retry that for many seconds when the legacy Redis is down, which
    would stall the hot standby. A second app, never connected, only names the result keys.
    After a failed send, sends fail at once for `BREAKER_S`, so Dramatiq takes over quickly.
    """

    def __init__(self, broker_url: str, backend_url: str, key_prefix: str = "") -> None:
        try:
            from celery import Celery
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise LegacyUnavailable("the legacy split needs `pip install crucible[legacy]`") from exc
        self.broker_url = broker_url
        transport = {"global_keyprefix": key_prefix} if key_prefix else {}
        self.app = Celery("crucible-legacy-client", broker=broker_url)
        self.app.conf.update(
            task_serializer="json",
            accept_content=["json"],
            broker_connection_timeout=SOCKET_TIMEOUT_S,
            broker_transport_options={
                **transport,
                "socket_timeout": SOCKET_TIMEOUT_S,
                "socket_connect_timeout": SOCKET_TIMEOUT_S,
            },
        )
        naming = Celery("crucible-legacy-keys", backend=backend_url)
        naming.conf.update(result_backend_transport_options=transport)
        self._result_key = naming.backend.get_key_for_task
        self.results: aioredis.Redis = async_client(backend_url, decode=False)
        self._threads = ThreadPoolExecutor(max_workers=4, thread_name_prefix="legacy-celery")
        self._down_until = 0.0

    async def _blocking(self, call: Any, *args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._threads, partial(call, *args, **kwargs))

    async def send(self, eval_id: str, code: str, language: str, level: str) -> None:
        """Hand one evaluation to the legacy workers; raises LegacyUnavailable if it cannot."""
        if time.monotonic() < self._down_until:
            raise LegacyUnavailable("the legacy broker failed moments ago")
        try:
            await self._blocking(
                self.app.send_task,
                LEGACY_TASK,
                args=[eval_id, code, language],
                task_id=task_id_of(eval_id),
                queue=LEGACY_QUEUES[level],
                retry_policy=SEND_RETRY_POLICY,
            )
        except Exception as exc:  # kombu raises many kinds (OperationalError, socket errors...)
            self._down_until = time.monotonic() + BREAKER_S
            raise LegacyUnavailable(f"{type(exc).__name__}: {exc}") from exc

    async def states(self, task_ids: list[str]) -> dict[str, LegacyState | None]:
        """Each task's stored state; None while the backend has nothing (Celery's PENDING).

        A stored result this service cannot read (not JSON) is a failure saying so, so the
        evaluation ends instead of waiting forever.
        """
        if not task_ids:
            return {}
        raws = await self.results.mget([self._result_key(t) for t in task_ids])
        states: dict[str, LegacyState | None] = {}
        for task_id, raw in zip(task_ids, raws, strict=True):
            try:
                states[task_id] = LegacyState.from_meta(raw) if raw else None
            except ValueError as exc:  # JSON, UTF-8 or date errors
                states[task_id] = LegacyState("FAILURE", {"exc_type": "UnreadableLegacyResult",
                                              "exc_message": [str(exc)]}, None, None)  # fmt: skip
        return states

    async def revoke(self, task_id: str, terminate: bool) -> None:
        """Celery's revoke: workers drop it if it has not started; `terminate` kills it if it has.

        Raises LegacyUnavailable when the broadcast cannot be sent."""
        try:
            await self._blocking(self.app.control.revoke, task_id, terminate=terminate, signal="SIGKILL")
        except Exception as exc:  # kombu's connection errors
            raise LegacyUnavailable(f"{type(exc).__name__}: {exc}") from exc

    async def close(self) -> None:
        await self.results.aclose()
        self._threads.shutdown(wait=False)
