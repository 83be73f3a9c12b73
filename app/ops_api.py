"""Operators' endpoints: migration status and knobs, Celery-shaped status, queue status, /metrics."""

from __future__ import annotations

import time
from urllib.parse import urlsplit, urlunsplit

import dramatiq
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from app.config import LEVELS
from app.errors import RequestError
from app.migration import SYSTEMS, migration_report
from app.services import Services
from app.store import STATUSES
from app.validation import read_json_object, require_bool, require_number


def redact(url: str) -> str:
    """A URL without its password, fit for a status page."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


class OpsApi:
    def __init__(self, services: Services) -> None:
        self.services = services
        self.settings = services.settings
        self.client = services.client
        self.store = services.store
        self.control = services.control

    async def migration_status(self, request: Request) -> JSONResponse:
        return JSONResponse(await migration_report(self.control, self.store))

    async def change_migration(self, request: Request) -> JSONResponse:
        """`{"dramatiq_share": 0.5, "force_legacy": false, "shadow_rate": 0.1}` or `{"reset": true}`."""
        body = await read_json_object(request)
        known = {"dramatiq_share", "force_legacy", "shadow_rate", "reset"}
        if not body or set(body) - known:
            raise RequestError(422, f"give one or more of {sorted(known)}", unknown=sorted(set(body) - known))
        if require_bool(body, "reset", default=False):
            await self.control.reset()
        await self.control.set(
            dramatiq_share=require_number(body, "dramatiq_share", default=None, low=0, high=1),
            force_legacy=require_bool(body, "force_legacy", default=None),
            shadow_rate=require_number(body, "shadow_rate", default=None, low=0, high=1),
        )
        return JSONResponse(await migration_report(self.control, self.store))

    async def _workers(self) -> dict[str, float]:
        """Worker ids heard from within the heartbeat timeout, with their last heartbeat (s ago)."""
        now_ms = time.time() * 1000
        beats = await self.client.zrange(f"{self.store.ns}:heartbeats", 0, -1, withscores=True)
        timeout = self.settings.heartbeat_timeout_ms
        return {w: round((now_ms - ms) / 1000, 1) for w, ms in beats if now_ms - ms <= timeout}

    async def celery_status(self, request: Request) -> JSONResponse:
        """The Celery service's status shape, answered from our broker's own records."""
        sizes = await self.services.enqueuer.queue_sizes()
        workers = await self._workers()
        return JSONResponse(
            {
                "enabled": True,
                "connected": bool(await self.client.ping()),
                "workers": sorted(workers),
                "broker_url": redact(self.settings.redis_url_or_default),
                "active_tasks": sizes["in_flight"],
                "scheduled_tasks": sizes["delayed"],
                "registered_tasks": sorted(dramatiq.get_broker().get_declared_actors()),
                "worker_stats": {w: {"last_heartbeat_s_ago": ago} for w, ago in workers.items()},
                "queue_details": {level: {"ready": sizes[level]} for level in LEVELS},
                "migration": await migration_report(self.control, self.store),
            }
        )

    async def queue_status(self, request: Request) -> JSONResponse:
        ns = self.store.ns
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.zcard(f"{ns}:evals:queued")
            pipe.zcard(f"{ns}:evals:running")
            pipe.zcard(f"{ns}:evals")
            queued, running, total = await pipe.execute()
        sizes = await self.services.enqueuer.queue_sizes()
        return JSONResponse(
            {
                "queued": queued,
                "processing": running,
                "queue_length": sum(sizes[level] for level in LEVELS),
                "total_tasks": total,
                "queues": sizes,
            }
        )

    async def metrics(self, request: Request) -> Response:
        """Prometheus exposition, read from Redis so every API process reports the same numbers."""
        families = await self._metric_families()
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Fixed(families))
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    async def _metric_families(self) -> list[Metric]:
        sizes = await self.services.enqueuer.queue_sizes()
        dead = await self.services.dlq.get_queue_size()
        stats: dict[str, str] = await self.client.hgetall(self.store.stats_key)
        report = await migration_report(self.control, self.store)
        workers = await self._workers()

        queue = GaugeMetricFamily(
            "crucible_queue_messages", "Messages by queue and state", labels=["queue", "state"]
        )
        for level in LEVELS:
            queue.add_metric([level, "ready"], sizes[level])
        queue.add_metric(["all", "delayed"], sizes["delayed"])
        queue.add_metric(["all", "in_flight"], sizes["in_flight"])
        queue.add_metric(["all", "dead"], dead)

        submitted = CounterMetricFamily(
            "crucible_evaluations_submitted", "Evaluations accepted, by queue system", labels=["queue_system"]
        )
        finished = CounterMetricFamily(
            "crucible_evaluations_finished",
            "Evaluations that reached a final status",
            labels=["queue_system", "status"],
        )
        by_language = CounterMetricFamily(
            "crucible_evaluations_by_language", "Final statuses by language", labels=["language", "status"]
        )
        fallbacks = CounterMetricFamily(
            "crucible_migration_fallbacks", "Submissions taken over by the other system", labels=["to"]
        )
        for system in SYSTEMS:
            submitted.add_metric([system], int(stats.get(f"submitted:{system}", 0)))
            fallbacks.add_metric([system], int(stats.get(f"fallback_to:{system}", 0)))
            for status in STATUSES[2:]:
                finished.add_metric([system, status], int(stats.get(f"final:{system}:{status}", 0)))
        for name, value in stats.items():
            if name.startswith("language:"):
                _, language, status = name.split(":", 2)
                by_language.add_metric([language, status], int(value))

        latency = GaugeMetricFamily(
            "crucible_submit_to_result_seconds",
            "Submit-to-result latency over the latest 1000 results",
            labels=["queue_system", "quantile"],
        )
        for system in SYSTEMS:
            for q in ("p50", "p95", "p99"):
                value = report["systems"][system]["latency_ms"][q]
                if value is not None:
                    latency.add_metric([system, str(int(q[1:]) / 100)], value / 1000)

        shadow = CounterMetricFamily(
            "crucible_shadow_comparisons", "Shadow runs compared across systems", labels=["result"]
        )
        shadow.add_metric(["matched"], report["shadow"]["matched"])
        shadow.add_metric(["mismatched"], report["shadow"]["mismatched"])
        share = GaugeMetricFamily(
            "crucible_migration_dramatiq_share", "Share of new submissions for Dramatiq"
        )
        split = report["split"]
        share.add_metric([], 0.0 if split["force_legacy"] else split["dramatiq_share"])
        online = GaugeMetricFamily(
            "crucible_workers_online", "Workers heard from within the heartbeat timeout"
        )
        online.add_metric([], len(workers))
        return [queue, submitted, finished, by_language, fallbacks, latency, shadow, share, online]


class _Fixed:
    """A collector that yields families already read (prometheus_client collects synchronously)."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families
