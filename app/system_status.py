"""What the system is doing right now, read from Redis: workers, queues, tasks, schedulers.

One reader for the status endpoints, `/metrics` and the dashboard, so they agree.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import redis.asyncio as aioredis

from actors.broker_view import BrokerView
from actors.scheduler import SCHEDULER_BEAT_S
from evaluations.redis_keys import RedisKeys
from infra.credentials import executor_headers
from infra.settings import Settings

EXECUTOR_TIMEOUT_S = 1.0
_INT_FIELDS = ("pid", "concurrency", "active", "processed", "failed", "retried", "started_ms", "last_seen_ms")


class SystemStatus:
    def __init__(self, client: aioredis.Redis, settings: Settings, http: httpx.AsyncClient) -> None:
        self.client = client
        self.settings = settings
        self.keys = RedisKeys(settings.namespace)
        self.broker = BrokerView(client, settings.namespace)
        self.http = http
        self.headers = executor_headers(settings.executor_secret)

    async def server_ms(self) -> float:
        return await self.broker.server_ms()

    async def workers(self) -> list[dict[str, Any]]:
        """Every worker process heard from in the last hour, with the evaluations it holds now.

        `online` is the broker's own verdict: its heartbeat (Redis time) is within the timeout,
        the same test that decides when a worker's messages are handed to others.
        """
        ids = await self.client.zrange(self.keys.workers, 0, -1)
        if not ids:
            return []
        async with self.client.pipeline(transaction=False) as pipe:
            for worker_id in ids:
                pipe.hgetall(self.keys.worker(worker_id))
            records = await pipe.execute()
        deliveries = await self.broker.deliveries(ids)
        now_ms = await self.server_ms()
        workers = []
        for record, (held, beat) in zip(records, deliveries, strict=True):
            if not record:
                continue
            worker: dict[str, Any] = dict(record)
            for name in _INT_FIELDS:
                worker[name] = int(worker.get(name) or 0)
            worker["load"] = float(worker.get("load") or 0)
            worker["queues"] = [q for q in worker.get("queues", "").split(",") if q]
            worker["actors"] = [a for a in worker.get("actors", "").split(",") if a]
            worker["retry_policies"] = json.loads(worker.get("retry_policies") or "null")
            last_beat = beat if beat is not None else worker["last_seen_ms"]
            worker["last_seen_s"] = round(max(0.0, now_ms - last_beat) / 1000, 1)
            worker["online"] = beat is not None and now_ms - beat <= self.settings.heartbeat_timeout_ms
            worker["active_tasks"] = await self.broker.task_ids(sorted(held)) if worker["online"] else []
            workers.append(worker)
        return sorted(workers, key=lambda w: (not w["online"], w["name"]))

    async def scheduled(self) -> list[dict[str, Any]]:
        """Messages waiting for a retry, soonest first."""
        return await self.broker.scheduled()

    async def queues(self) -> dict[str, dict[str, Any]]:
        return await self.broker.queues()

    async def schedulers(self) -> list[dict[str, Any]]:
        now_ms = await self.server_ms()
        beats = await self.client.zrange(self.keys.schedulers, 0, -1, withscores=True)
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
