"""The dead-letter queue: entries the DeadLetters middleware wrote, read and acted on.

`AsyncDeadLetterQueue` serves the API and the scheduler; the Celery service's synchronous
`DeadLetterQueue` (in `app.celery.shim`, importable from `tasks`) wraps it.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import Counter
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import WatchError

from actors.broker import AsyncEnqueuer
from evaluations.queue import LEVEL_OPTION, decode_message, task_id_of
from evaluations.redis_keys import RedisKeys
from evaluations.status import RETRY_DEAD_LETTER, Status
from evaluations.store import EvaluationStore, StatusChange
from middleware.state import FAILURE_OPTIONS

T = TypeVar("T")

#: Warn operators when the DLQ holds more than this many entries.
WARNING_THRESHOLD = 100
#: A retry that loses its optimistic transaction to a concurrent change tries this often.
RETRY_ATTEMPTS = 3


class NotInDLQ(KeyError):
    """No entry with this task id."""


class NotRetryable(ValueError):
    """The entry's evaluation is no longer failed (it was retried or resubmitted meanwhile)."""


def public_entry(entry: dict[str, Any]) -> dict[str, Any]:
    """An entry without the internal copy of the message."""
    return {k: v for k, v in entry.items() if k != "message"}


class AsyncDeadLetterQueue:
    def __init__(
        self,
        client: aioredis.Redis,
        namespace: str,
        store: EvaluationStore,
        warning_threshold: int = WARNING_THRESHOLD,
    ) -> None:
        self.client = client
        self.warning_threshold = warning_threshold
        self.index = RedisKeys(namespace).dlq
        self.entries = RedisKeys(namespace).dlq_entries
        self.store = store
        self.enqueuer = AsyncEnqueuer(client, namespace)

    async def add_task(self, entry: dict[str, Any]) -> str:
        """Store an entry by hand (the middleware writes its own atomically with the nack)."""
        task_id = str(entry["task_id"])
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.zadd(self.index, {task_id: time.time() * 1000})
            pipe.hset(self.entries, task_id, json.dumps(entry))
            await pipe.execute()
        return task_id

    async def get_task(self, task_id: str) -> dict[str, Any] | None:
        raw = await self.client.hget(self.entries, task_id)
        return json.loads(raw) if raw else None

    async def list_tasks(self, limit: int = 100, offset: int = 0, eval_id: str | None = None) -> list[dict]:
        """Newest failures first."""
        if eval_id is not None:
            entry = await self.get_task(task_id_of(eval_id))
            return [entry][offset : offset + limit] if entry else []
        ids = await self.client.zrevrange(self.index, offset, offset + limit - 1)
        raws = await self.client.hmget(self.entries, ids) if ids else []
        return [json.loads(raw) for raw in raws if raw]

    async def get_all_tasks(self) -> list[dict[str, Any]]:
        return [json.loads(raw) for raw in (await self.client.hgetall(self.entries)).values()]

    async def get_queue_size(self) -> int:
        return await self.client.zcard(self.index)

    async def remove_task(self, task_id: str) -> bool:
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.zrem(self.index, task_id)
            pipe.hdel(self.entries, task_id)
            removed, _ = await pipe.execute()
        return bool(removed)

    async def retry_task(self, task_id: str) -> bool:
        """Send the original message again (same eval_id, counts reset) and drop the entry.

        Optimistic transaction on the entry and the record: two retries of one entry at once
        enqueue it once; the other finds the entry gone.
        """
        for _ in range(RETRY_ATTEMPTS):
            try:
                return await self._retry_once(task_id)
            except WatchError:
                continue
        raise NotRetryable(f"entry {task_id} kept changing; try again")

    async def _retry_once(self, task_id: str) -> bool:
        async with self.client.pipeline(transaction=True) as pipe:
            await pipe.watch(self.entries)
            raw = await pipe.hget(self.entries, task_id)
            if raw is None:
                raise NotInDLQ(task_id)
            entry = json.loads(raw)
            if "message" not in entry:
                raise NotRetryable(f"entry {task_id} holds no original message to send again")
            eval_id = entry.get("eval_id")
            if eval_id:
                await pipe.watch(self.store.keys.record(eval_id))
            record = await self.store.get(eval_id) if eval_id else None
            if record is not None and record["status"] != Status.FAILED:
                raise NotRetryable(f"evaluation {eval_id} is {record['status']}, not failed")
            original = decode_message(entry["message"].encode())
            options = {k: v for k, v in original.options.items() if k not in FAILURE_OPTIONS}
            message = dataclasses.replace(original, options=options)
            pipe.multi()
            if record is not None:
                reset = {"retries": 0, "error": "", "completed_at": "", "started_at": "", "next_retry_at": "",
                         "internal_error": False, "submitted_at_ms": int(time.time() * 1000)}  # fmt: skip
                await self.store.transition_in(
                    pipe, StatusChange.by(RETRY_DEAD_LETTER, eval_id, Status.QUEUED, reset)
                )
                # A second run: counted as a submission, so finals never outnumber submissions.
                system = record.get("queue_system") or "dramatiq"
                pipe.hincrby(self.store.keys.stats, f"submitted:{system}", 1)
            await self.enqueuer.enqueue_in(pipe, message, options.get(LEVEL_OPTION, "default"))
            pipe.zrem(self.index, task_id)
            pipe.hdel(self.entries, task_id)
            await pipe.execute()
        return True

    async def clear_old_tasks(self, days: float = 30) -> int:
        """Remove entries whose last failure is older than `days`."""
        cutoff = (time.time() - days * 86400) * 1000
        old = await self.client.zrangebyscore(self.index, 0, cutoff)
        if old:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.zrem(self.index, *old)
                pipe.hdel(self.entries, *old)
                await pipe.execute()
        return len(old)

    async def get_statistics(self) -> dict[str, Any]:
        entries = await self.get_all_tasks()
        return {
            "queue_size": len(entries),
            "exception_breakdown": dict(Counter(e.get("exception_class") or "unknown" for e in entries)),
            "task_breakdown": dict(Counter(e.get("task_name") or "unknown" for e in entries)),
            "warning_threshold": self.warning_threshold,
            "over_threshold": len(entries) > self.warning_threshold,
        }
