"""Operators' endpoints: migration status and knobs, Celery-shaped status, queue status, /metrics."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from itertools import accumulate
from typing import Any

import redis.asyncio as aioredis
import structlog
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import Response

from app.celery.wire_status import wire_status
from app.migration.control import SYSTEMS, migration_report
from app.services import Services
from app.system_status import SystemStatus
from evaluations.errors import InvalidInput
from evaluations.queue import LEVELS
from evaluations.status import STATUSES, TERMINAL, Status
from evaluations.store import HISTOGRAM_BOUNDS_MS
from evaluations.validation import require_bool, require_number
from evaluations.webhooks import CALLBACK_OUTCOMES
from infra.redis_client import describe_redis
from infra.redis_memory import memory_use
from infra.web import JSONResponse, query_int, read_json_object

log = structlog.get_logger(__name__)

HEALTH_TIMEOUT_S = 1.0
#: A test-case submission's verdicts (executor/cases.py), and its cases' statuses: each is
#: served from the first scrape (at 0); any other that status.lua counted is served too.
VERDICTS = ("accepted", "wrong_answer", "timeout", "memory_limit_exceeded", "output_limit_exceeded",
            "runtime_error", "checker_error", "compile_error", "cancelled")  # fmt: skip
CASE_STATUSES = ("accepted", "wrong_answer", "timeout", "memory_limit_exceeded", "output_limit_exceeded",
                 "runtime_error", "checker_error", "skipped")  # fmt: skip


class OpsApi:
    def __init__(self, services: Services) -> None:
        self.services = services
        self.settings = services.settings
        self.client = services.client
        self.store = services.store
        self.control = services.control
        self.status = SystemStatus(services.client, services.settings, services.http)

    async def migration_status(self, request: Request) -> JSONResponse:
        return JSONResponse(await migration_report(self.control, self.store))

    async def change_migration(self, request: Request) -> JSONResponse:
        """`{"dramatiq_share": 0.5, "force_legacy": false, "shadow_rate": 0.1}` or `{"reset": true}`."""
        body = await read_json_object(request, self.settings.body_timeout_s)
        known = {"dramatiq_share", "force_legacy", "shadow_rate", "reset"}
        if not body or set(body) - known:
            raise InvalidInput(f"give one or more of {sorted(known)}", unknown=sorted(set(body) - known))
        reset = require_bool(body, "reset", default=False)  # everything is checked before any change
        share = require_number(body, "dramatiq_share", default=None, low=0, high=1)
        force = require_bool(body, "force_legacy", default=None)
        shadow = require_number(body, "shadow_rate", default=None, low=0, high=1)
        if reset:
            await self.control.reset()
        await self.control.set(dramatiq_share=share, force_legacy=force, shadow_rate=shadow)
        return JSONResponse(await migration_report(self.control, self.store))

    async def health(self, request: Request) -> JSONResponse:
        """Redis (503 when unreachable, within about a second), then workers, executors and
        schedulers: "degraded" (still 200: the API itself works) when one kind has none online.
        Public, so it names no addresses (`/api/celery-status` has the details)."""
        try:
            async with asyncio.timeout(HEALTH_TIMEOUT_S):
                await self.client.ping()
                sizes = await self.services.enqueuer.queue_sizes()
                memory = await memory_use(self.client)
                shed = await self.client.hmget(self.store.keys.stats, ["shed:removed", "shed:trimmed"])
        except (TimeoutError, aioredis.ConnectionError, aioredis.TimeoutError) as exc:
            # public: no addresses or error texts, those are in the logs and admin endpoints
            log.warning("health.redis_unavailable", error=str(exc) or type(exc).__name__)
            return JSONResponse({"status": "unhealthy", "redis": "unavailable"}, status_code=503)
        workers = [w for w in await self.status.workers() if w["online"]]
        executors = await self.status.executors()
        schedulers = [s for s in await self.status.schedulers() if s["online"]]
        checks = {
            "workers": len(workers),
            "executors": sum(e["online"] for e in executors),
            "schedulers": len(schedulers),
        }
        # new submissions are refused at the full share: say so a little before
        filling = memory.share is not None and memory.share >= self.settings.redis_full_share - 0.1
        wire = await self._wire_status()
        healthy = all(checks.values()) and not filling and not wire["problem"]
        return JSONResponse(
            {
                "status": "healthy" if healthy else "degraded",
                "redis": "ok",
                **{f"{name}_online": count for name, count in checks.items()},
                "queues": sizes,
                # with what was shed to make room (finished evaluations removed, outputs trimmed)
                "redis_memory": {
                    **memory.as_dict(),
                    "shed_evaluations": int(shed[0] or 0),
                    "shed_outputs_trimmed": int(shed[1] or 0),
                },
                "storage": "nearly_full" if filling else "ok",
                "celery_wire": wire,
            }
        )

    async def _wire_status(self) -> dict[str, Any]:
        return await wire_status(self.client, self.store.keys, self.settings.celery_wire_queues)

    async def celery_status(self, request: Request) -> JSONResponse:
        """The Celery service's status shape, answered from our broker's own records."""
        workers = await self.status.workers()
        online = [w for w in workers if w["online"]]
        active = {w["name"]: w["active_tasks"] for w in online}
        scheduled = await self.status.scheduled()
        return JSONResponse(
            {
                "enabled": True,
                "connected": bool(await self.client.ping()),
                # the original's counts; the detail under keys of their own
                "workers": len(online),
                "active_tasks": sum(len(tasks) for tasks in active.values()),
                "scheduled_tasks": len(scheduled),
                "worker_names": [w["name"] for w in online],
                "active_tasks_by_worker": active,
                "scheduled_tasks_detail": scheduled,
                "broker_url": describe_redis(self.settings),
                # this API process's table; each worker's own is in worker_stats
                "retry_policies": self.settings.retry_policies,
                "registered_tasks": sorted({a for w in online for a in w["actors"]}),
                "worker_stats": {w["name"]: w for w in workers},
                "queue_details": await self.status.queues(),
                "schedulers": await self.status.schedulers(),
                "celery_wire": await wire_status(
                    self.client, self.store.keys, self.settings.celery_wire_queues
                ),
                "migration": await migration_report(self.control, self.store),
            }
        )

    async def rates(self, request: Request) -> JSONResponse:
        """Per minute over the last `minutes` (≤ 120): submitted, finished by status, success and
        failure rates, latency percentiles (bucket upper bounds, ms); and the whole window."""
        window = query_int(
            request.query_params.get("minutes") or None, "minutes", default=60, low=1, high=120
        )
        now_minute = int(time.time() // 60)
        minutes = list(range(now_minute - window + 1, now_minute + 1))
        async with self.client.pipeline(transaction=False) as pipe:
            for minute in minutes:
                pipe.hgetall(self.store.keys.minute(minute))
            counts: list[dict[str, str]] = await pipe.execute()
        total: Counter[str] = Counter()
        for c in counts:
            total.update({k: int(v) for k, v in c.items()})
        return JSONResponse(
            {
                "minutes": [
                    {"minute_ms": m * 60000, **minute_rates({k: int(v) for k, v in c.items()})}
                    for m, c in zip(minutes, counts, strict=True)
                ],
                "hour": minute_rates(dict(total)),
            }
        )

    async def queue_status(self, request: Request) -> JSONResponse:
        keys = self.store.keys
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.zcard(keys.by_status(Status.QUEUED))
            pipe.zcard(keys.by_status(Status.RUNNING))
            pipe.zcard(keys.evaluations)
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
        queues = await self.status.queues()
        stats: dict[str, str] = await self.client.hgetall(self.store.keys.stats)
        report = await migration_report(self.control, self.store)
        workers = [w for w in await self.status.workers() if w["online"]]
        executors = await self.status.executors()

        queue = GaugeMetricFamily(
            "crucible_queue_messages", "Messages by queue and state", labels=["queue", "state"]
        )
        for level, sizes in queues.items():
            for state in ("ready", "delayed", "in_flight", "dead"):
                queue.add_metric([level, state], sizes[state])
        oldest = GaugeMetricFamily(
            "crucible_queue_oldest_age_seconds", "Age of the oldest ready message", labels=["queue"]
        )
        for level, sizes in queues.items():
            oldest.add_metric([level], sizes["oldest_age_s"] or 0)

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
        verdicts = CounterMetricFamily(
            "crucible_verdicts",
            "Submissions with test cases that reached a final status, by verdict",
            labels=["verdict"],
        )
        cases = CounterMetricFamily(
            "crucible_cases", "Test cases of finished submissions, by status", labels=["status"]
        )
        for family, prefix, known in ((verdicts, "verdict:", VERDICTS), (cases, "case:", CASE_STATUSES)):
            seen = {name.removeprefix(prefix): int(v) for name, v in stats.items() if name.startswith(prefix)}
            for label in dict.fromkeys([*known, *sorted(seen)]):
                family.add_metric([label], seen.get(label, 0))

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
        in_flight = GaugeMetricFamily(
            "crucible_executor_runs_in_flight", "Sandboxed runs in progress", labels=["executor"]
        )
        for executor in executors:
            if executor["online"]:
                in_flight.add_metric([executor["url"]], executor["running"])
        callbacks = CounterMetricFamily(
            "crucible_callbacks", "Webhook delivery attempts, by outcome", labels=["outcome"]
        )
        seen = {
            name.removeprefix("callback:"): int(v)
            for name, v in stats.items()
            if name.startswith("callback:")
        }
        for outcome in dict.fromkeys([*CALLBACK_OUTCOMES, *sorted(seen)]):
            callbacks.add_metric([outcome], seen.get(outcome, 0))
        retries = CounterMetricFamily("crucible_retries", "Retries scheduled, by policy", labels=["policy"])
        for policy in self.settings.retry_policies:
            retries.add_metric([policy], int(stats.get(f"retry:{policy}", 0)))
        memory = await memory_use(self.client)
        redis_memory = GaugeMetricFamily(
            "crucible_redis_memory_bytes", "Redis's used memory and its maxmemory (0: none)", labels=["kind"]
        )
        redis_memory.add_metric(["used"], memory.used_bytes)
        redis_memory.add_metric(["max"], memory.max_bytes)
        shed = CounterMetricFamily(
            "crucible_storage_shed",
            "Shed to make room in a nearly full Redis: finished evaluations removed, outputs trimmed",
            labels=["kind"],
        )
        shed.add_metric(["evaluation_removed"], int(stats.get("shed:removed", 0)))
        shed.add_metric(["output_trimmed"], int(stats.get("shed:trimmed", 0)))
        histograms = [
            await self._histogram("crucible_queue_wait_seconds", "Queued to started", "wait_ms"),
            await self._histogram("crucible_run_duration_seconds", "Run time in the sandbox", "run_ms"),
        ]
        return [queue, oldest, submitted, finished, by_language, verdicts, cases, fallbacks, latency, shadow,
                share, online, in_flight, retries, callbacks, redis_memory, shed, *histograms]  # fmt: skip

    async def _histogram(self, name: str, documentation: str, key: str) -> HistogramMetricFamily:
        """A Prometheus histogram from the per-bucket counts status.lua keeps (in ms)."""
        raw: dict[str, str] = await self.client.hgetall(self.store.keys.histogram(key))
        counts = accumulate(int(raw.get(f"in:{ms}", 0)) for ms in HISTOGRAM_BOUNDS_MS)
        buckets = [(str(ms / 1000), count) for ms, count in zip(HISTOGRAM_BOUNDS_MS, counts, strict=True)]
        family = HistogramMetricFamily(name, documentation)
        family.add_metric(
            [],
            buckets=[*buckets, ("+Inf", int(raw.get("count", 0)))],
            sum_value=float(raw.get("sum", 0)) / 1000,
        )
        return family


def minute_rates(counts: dict[str, int]) -> dict[str, Any]:
    """Rates and latency percentiles from one window's counters (see lua/status.lua)."""
    finals = {s: counts.get(s, 0) for s in TERMINAL}
    finished = sum(finals.values())
    failures = finished - finals["completed"] - finals["cancelled"]
    buckets = sorted(
        ((float(k[4:]), v) for k, v in counts.items() if k.startswith("lat:")), key=lambda b: b[0]
    )
    return {
        "submitted": counts.get("submitted", 0),
        "finished": finished,
        "by_status": finals,
        "success_rate": round(finals["completed"] / finished, 4) if finished else None,
        "failure_rate": round(failures / finished, 4) if finished else None,
        "latency_ms": {f"p{round(q * 100)}": bucket_percentile(buckets, q) for q in (0.5, 0.95, 0.99)},
    }


def bucket_percentile(buckets: list[tuple[float, int]], q: float) -> int | None:
    """The upper bound of the bucket holding the q-th observation (None past the last bound)."""
    total = sum(n for _, n in buckets)
    seen = 0
    for bound, n in buckets:
        seen += n
        if total and seen >= q * total:
            return None if bound == float("inf") else int(bound)
    return None


class _Fixed:
    """A collector that yields families already read (prometheus_client collects synchronously)."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families
