"""What the broker holds, read for operators (status endpoints, `/metrics`, the dashboard).

The broker's keys are its own (actors/lua/dispatch.lua writes them): code above this layer
reads its state through these methods, never through the keys.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import Any

import redis.asyncio as aioredis

from evaluations.queue import LEVEL_OPTION, LEVELS, decode_message
from evaluations.redis_keys import RedisKeys


class BrokerView:
    def __init__(self, client: aioredis.Redis, namespace: str) -> None:
        self.client = client
        self.keys = RedisKeys(namespace)

    async def server_ms(self) -> float:
        """Redis's clock: heartbeats are stamped with it, so no host's clock skew matters."""
        seconds, micros = await self.client.time()
        return seconds * 1000 + micros / 1000

    async def deliveries(self, worker_ids: list[str]) -> list[tuple[set[str], float | None]]:
        """Per worker: the message ids it fetched and has not acked, and its last heartbeat
        (Redis time, ms; None if it never beat or was taken for dead)."""
        async with self.client.pipeline(transaction=False) as pipe:
            for worker_id in worker_ids:
                pipe.smembers(self.keys.acks(worker_id))
                pipe.zscore(self.keys.heartbeats, worker_id)
            raw = await pipe.execute()
        return list(zip(raw[::2], raw[1::2], strict=True))

    async def task_ids(self, message_ids: list[str]) -> list[str]:
        """The task ids of messages (those still known)."""
        if not message_ids:
            return []
        return [t for t in await self.client.hmget(self.keys.message_tasks, message_ids) if t]

    async def scheduled(self, limit: int = 100) -> list[dict[str, Any]]:
        """Messages waiting for a retry, soonest first."""
        delayed = await self.client.zrange(self.keys.delayed, 0, limit - 1, withscores=True)
        tasks = await self.task_ids([m for m, _ in delayed])
        return [{"task_id": t, "eta_ms": int(eta)} for t, (_, eta) in zip(tasks, delayed, strict=False)]

    async def queues(self) -> dict[str, dict[str, Any]]:
        """Per level: ready, delayed (waiting to retry), in flight, dead-lettered, oldest ready age."""
        keys = self.keys
        worker_ids = await self.client.zrange(keys.heartbeats, 0, -1)
        async with self.client.pipeline(transaction=False) as pipe:
            for level in LEVELS:
                pipe.llen(keys.queue(level))
                pipe.lindex(keys.queue(level), 0)
            pipe.zrange(keys.delayed, 0, -1)
            for worker_id in worker_ids:
                pipe.smembers(keys.acks(worker_id))
            pipe.hvals(keys.dlq_entries)
            raw = await pipe.execute()
        heads = raw[: 2 * len(LEVELS)]
        delayed_ids, *held_sets, dead_entries = raw[2 * len(LEVELS) :]
        held = [m for members in held_sets for m in members]
        by_level = await self._levels_of([*delayed_ids, *held])
        delayed = Counter(by_level.get(m) for m in delayed_ids)
        in_flight = Counter(by_level.get(m) for m in held)
        dead = Counter(_dead_level(entry) for entry in dead_entries)
        now_ms = time.time() * 1000
        out: dict[str, dict[str, Any]] = {}
        for index, level in enumerate(LEVELS):
            ready, head = heads[2 * index], heads[2 * index + 1]
            oldest = await self._enqueued_ms(head) if head else None
            out[level] = {
                "ready": ready,
                "delayed": delayed[level],
                "in_flight": in_flight[level],
                "dead": dead[level],
                "oldest_age_s": round((now_ms - oldest) / 1000, 1) if oldest else None,
            }
        return out

    async def _levels_of(self, message_ids: list[str]) -> dict[str, str]:
        if not message_ids:
            return {}
        levels = await self.client.hmget(self.keys.message_levels, message_ids)
        return {m: level for m, level in zip(message_ids, levels, strict=True) if level}

    async def _enqueued_ms(self, message_id: str) -> int | None:
        data = await self.client.hget(self.keys.messages, message_id)
        return decode_message(data.encode()).message_timestamp if data else None


def _dead_level(raw_entry: str) -> str:
    """The level a dead-lettered message was on (its saved message's option), default if unknown."""
    try:
        message = json.loads(raw_entry).get("message")
        return decode_message(message.encode()).options.get(LEVEL_OPTION, "default") if message else "default"
    except (ValueError, AttributeError):
        return "default"
