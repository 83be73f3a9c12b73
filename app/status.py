"""What the system is doing right now, read from Redis: workers, queues, tasks, schedulers.

One reader for the status endpoints, `/metrics` and the dashboard, so they agree.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from typing import Any

import httpx
import redis.asyncio as aioredis

from actors.scheduler import SCHEDULER_BEAT_S, schedulers_key
from evaluations.credentials import executor_headers
from evaluations.queue import LEVEL_OPTION, LEVELS, decode_message
from evaluations.settings import Settings
from middleware.worker_stats import worker_key, workers_key

EXECUTOR_TIMEOUT_S = 1.0
_INT_FIELDS = ("pid", "concurrency", "active", "processed", "failed", "retried", "started_ms", "last_seen_ms")


class SystemStatus:
    def __init__(self, client: aioredis.Redis, settings: Settings, http: httpx.AsyncClient) -> None:
        self.client = client
        self.settings = settings
        self.ns = settings.namespace
        self.http = http
        self.headers = executor_headers(settings.executor_secret)

    async def server_ms(self) -> float:
        """Redis's clock: heartbeats are stamped with it, so no host's clock skew matters."""
        seconds, micros = await self.client.time()
        return seconds * 1000 + micros / 1000

    async def workers(self) -> list[dict[str, Any]]:
        """Every worker process heard from in the last hour, with the evaluations it holds now.

        `online` is the broker's own verdict: its heartbeat (Redis time) is within the timeout,
        the same test that decides when a worker's messages are handed to others.
        """
        ids = await self.client.zrange(workers_key(self.ns), 0, -1)
        if not ids:
            return []
        async with self.client.pipeline(transaction=False) as pipe:
            for worker_id in ids:
                pipe.hgetall(worker_key(self.ns, worker_id))
                pipe.smembers(f"{self.ns}:acks:{worker_id}")
                pipe.zscore(f"{self.ns}:heartbeats", worker_id)
            raw = await pipe.execute()
        now_ms = await self.server_ms()
        workers = []
        for record, held, beat in zip(raw[::3], raw[1::3], raw[2::3], strict=True):
            if not record:
                continue
            worker: dict[str, Any] = dict(record)
            for name in _INT_FIELDS:
                worker[name] = int(worker.get(name) or 0)
            worker["load"] = float(worker.get("load") or 0)
            worker["queues"] = [q for q in worker.get("queues", "").split(",") if q]
            worker["actors"] = [a for a in worker.get("actors", "").split(",") if a]
            last_beat = beat if beat is not None else worker["last_seen_ms"]
            worker["last_seen_s"] = round(max(0.0, now_ms - last_beat) / 1000, 1)
            worker["online"] = beat is not None and now_ms - beat <= self.settings.heartbeat_timeout_ms
            worker["active_tasks"] = await self._task_ids(sorted(held)) if worker["online"] else []
            workers.append(worker)
        return sorted(workers, key=lambda w: (not w["online"], w["name"]))

    async def _task_ids(self, message_ids: list[str]) -> list[str]:
        if not message_ids:
            return []
        return [t for t in await self.client.hmget(f"{self.ns}:task", message_ids) if t]

    async def scheduled(self) -> list[dict[str, Any]]:
        """Messages waiting for a retry, soonest first."""
        delayed = await self.client.zrange(f"{self.ns}:delayed", 0, 99, withscores=True)
        tasks = await self._task_ids([m for m, _ in delayed])
        return [{"task_id": t, "eta_ms": int(eta)} for t, (_, eta) in zip(tasks, delayed, strict=False)]

    async def queues(self) -> dict[str, dict[str, Any]]:
        """Per level: ready, delayed (waiting to retry), in flight, dead-lettered, oldest ready age."""
        ns = self.ns
        worker_ids = await self.client.zrange(f"{ns}:heartbeats", 0, -1)
        async with self.client.pipeline(transaction=False) as pipe:
            for level in LEVELS:
                pipe.llen(f"{ns}:queue:{level}")
                pipe.lindex(f"{ns}:queue:{level}", 0)
            pipe.zrange(f"{ns}:delayed", 0, -1)
            for worker_id in worker_ids:
                pipe.smembers(f"{ns}:acks:{worker_id}")
            pipe.hvals(f"{ns}:dlq:entries")
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
        levels = await self.client.hmget(f"{self.ns}:level", message_ids)
        return {m: level for m, level in zip(message_ids, levels, strict=True) if level}

    async def _enqueued_ms(self, message_id: str) -> int | None:
        data = await self.client.hget(f"{self.ns}:msgs", message_id)
        return decode_message(data.encode()).message_timestamp if data else None

    async def schedulers(self) -> list[dict[str, Any]]:
        now_ms = await self.server_ms()
        beats = await self.client.zrange(schedulers_key(self.ns), 0, -1, withscores=True)
        return [
            {
                "name": name,
                "last_seen_s": round((now_ms - ms) / 1000, 1),
                "online": now_ms - ms <= 3 * SCHEDULER_BEAT_S * 1000,
            }
            for name, ms in beats
        ]

    async def executors(self) -> list[dict[str, Any]]:
        """Each configured executor's health and runs in flight, asked in parallel (1 s at most)."""
        return list(await asyncio.gather(*(self._executor(url) for url in self.settings.executor_urls)))

    async def _executor(self, url: str) -> dict[str, Any]:
        try:
            async with asyncio.timeout(EXECUTOR_TIMEOUT_S):
                health = (await self.http.get(f"{url}/health")).json()
                running = (await self.http.get(f"{url}/running", headers=self.headers)).json()
            return {"url": url, "online": True, "running": running["count"], "capacity": running["capacity"],
                    "limits_enforced_by": health.get("limits_enforced_by")}  # fmt: skip
        except (TimeoutError, httpx.HTTPError, ValueError, KeyError) as exc:
            return {"url": url, "online": False, "error": str(exc) or type(exc).__name__}


def _dead_level(raw_entry: str) -> str:
    """The level a dead-lettered message was on (its saved message's option), default if unknown."""
    try:
        message = json.loads(raw_entry).get("message")
        return decode_message(message.encode()).options.get(LEVEL_OPTION, "default") if message else "default"
    except (ValueError, AttributeError):
        return "default"
