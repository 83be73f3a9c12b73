"""Moving traffic from the legacy Celery deployment: the split, its tracker, its report.

The split's knobs (share to Dramatiq, forced rollback, shadow sampling) start from the
environment and can be changed at run time in Redis (`crucible migration set ...`); every
API process reads them again within a second, so no worker or API restarts are needed.
`FORCE_LEGACY_QUEUE=true` in the environment always wins: it is the rollback that needs no
Redis command.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError

from app.config import Settings
from app.legacy import LegacyCelery, LegacyState
from app.store import TERMINAL, EvaluationStore, StatusChange, task_id_of, utc_now

if TYPE_CHECKING:
    from app.submission import Submitter

log = structlog.get_logger(__name__)

SYSTEMS = ("dramatiq", "legacy")
#: How long an API process trusts the knobs it read from Redis.
KNOBS_TTL_S = 1.0
MISMATCHES_KEPT = 100


def shadow_id(eval_id: str) -> str:
    """The id of the copy of `eval_id` run on the other system for comparison."""
    return f"{eval_id}.shadow"


def other(system: str) -> str:
    return "legacy" if system == "dramatiq" else "dramatiq"


@dataclass(frozen=True)
class Knobs:
    """The split as it stands: share of new submissions for Dramatiq, rollback, shadow sampling."""

    dramatiq_share: float
    force_legacy: bool
    shadow_rate: float


class MigrationControl:
    """Reads and changes the split's knobs (Redis hash `{ns}:migration` over the environment)."""

    def __init__(self, client: aioredis.Redis, settings: Settings, legacy_configured: bool) -> None:
        self.client = client
        self.settings = settings
        self.key = f"{settings.namespace}:migration"
        self.legacy_configured = legacy_configured
        self._cached: tuple[float, Knobs] | None = None

    async def knobs(self) -> Knobs:
        now = time.monotonic()
        if self._cached and now - self._cached[0] < KNOBS_TTL_S:
            return self._cached[1]
        try:
            stored = await self.client.hgetall(self.key)
        except RedisError as exc:  # keep routing (to the hot standby) while Redis is away
            log.warning("migration.knobs_unreadable", error=str(exc))
            knobs = self._cached[1] if self._cached else self._from(self.settings, {})
            self._cached = (now, knobs)
            return knobs
        knobs = self._from(self.settings, stored)
        self._cached = (now, knobs)
        return knobs

    @staticmethod
    def _from(s: Settings, stored: dict[str, str]) -> Knobs:
        """Run-time values stored in Redis over the environment's; FORCE_LEGACY_QUEUE always wins."""
        return Knobs(
            dramatiq_share=float(stored.get("dramatiq_share", s.dramatiq_share)),
            force_legacy=s.force_legacy or stored.get("force_legacy") == "1",
            shadow_rate=float(stored.get("shadow_rate", s.shadow_rate)),
        )

    async def set(
        self,
        *,
        dramatiq_share: float | None = None,
        force_legacy: bool | None = None,
        shadow_rate: float | None = None,
    ) -> None:
        """Store new values (None leaves a knob as it is); every API process sees them in ~1 s."""
        for name, value in (("dramatiq_share", dramatiq_share), ("shadow_rate", shadow_rate)):
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be between 0.0 and 1.0, got {value}")
        values: dict[str, str] = {}
        if dramatiq_share is not None:
            values["dramatiq_share"] = repr(float(dramatiq_share))
        if force_legacy is not None:
            values["force_legacy"] = "1" if force_legacy else "0"
        if shadow_rate is not None:
            values["shadow_rate"] = repr(float(shadow_rate))
        if values:
            await self.client.hset(self.key, mapping=values)
        self._cached = None

    async def reset(self) -> None:
        """Forget run-time changes: the environment's values apply again."""
        await self.client.delete(self.key)
        self._cached = None

    async def choose(self) -> str:
        """The system for one new submission."""
        if not self.legacy_configured:
            return "dramatiq"
        knobs = await self.knobs()
        if knobs.force_legacy:
            return "legacy"
        return "dramatiq" if random.random() < knobs.dramatiq_share else "legacy"

    async def shadow_wanted(self) -> bool:
        """Whether to run a copy of one submission on the other system too."""
        return self.legacy_configured and random.random() < (await self.knobs()).shadow_rate


def percentile(ordered: list[int], q: float) -> int | None:
    """Nearest-rank percentile of an ascending list."""
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


class MigrationTracker:
    """Brings the legacy system's results into our records, and compares shadow runs.

    Runs in each API process; every step is guarded (status transitions, SREM), so two
    processes tracking at once count each result once.
    """

    def __init__(self, store: EvaluationStore, legacy: LegacyCelery, submitter: Submitter) -> None:
        self.store = store
        self.client = store.client
        self.legacy = legacy
        self.submitter = submitter
        self.pending_key = legacy_pending_key(store.ns)
        self.shadows_key = shadow_pending_key(store.ns)

    async def run(self, interval: float = 0.5) -> None:
        """Track until cancelled; no error ends it (Redis may be away, a result may be odd)."""
        while True:
            try:
                await self.tick()
            except Exception as exc:
                log.warning("migration.track_failed", error=f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(interval)

    async def tick(self) -> None:
        await self.submitter.record_unrecorded()
        pending = sorted(await self.client.smembers(self.pending_key))
        states = await self.legacy.states([task_id_of(i) for i in pending])
        for eval_id in pending:
            state = states[task_id_of(eval_id)]
            if state is None:
                continue
            try:
                await self.settle(eval_id, state)
            except RedisError:
                raise
            except Exception as exc:  # one odd result must not stop the others
                log.warning("migration.settle_failed", eval_id=eval_id, error=f"{type(exc).__name__}: {exc}")
        await self.compare_shadows()

    async def settle(self, eval_id: str, state: LegacyState) -> None:
        """Copy one legacy task's state onto its record; a final one ends the tracking."""
        if state.state in ("STARTED", "RETRY"):
            await self.store.transition(eval_id, "running", ("queued",), started_at=utc_now())
            return
        if state.state not in ("SUCCESS", "FAILURE", "REVOKED"):
            return
        status, fields = legacy_outcome(state)
        fields["completed_at"] = utc_now()
        change = StatusChange(eval_id, status, ("queued", "running"), fields, at_ms=state.done_ms)
        async with self.client.pipeline(transaction=True) as pipe:
            await self.store.transition_in(pipe, change)
            pipe.srem(self.pending_key, eval_id)
            (done, _), _ = await pipe.execute()
        if done:
            log.info("legacy.finished", eval_id=eval_id, status=status)

    async def compare_shadows(self) -> None:
        for eval_id in await self.client.smembers(self.shadows_key):
            pair = [await self.store.get(eval_id), await self.store.get(shadow_id(eval_id))]
            if any(r is None for r in pair):
                await self.client.srem(self.shadows_key, eval_id)  # cleaned up meanwhile
                continue
            primary, copy = pair
            if primary["status"] not in TERMINAL or copy["status"] not in TERMINAL:
                continue
            if await self.client.srem(self.shadows_key, eval_id):
                await self.record_comparison(primary, copy)

    async def record_comparison(self, primary: dict[str, Any], copy: dict[str, Any]) -> None:
        same = primary["status"] == copy["status"] and (primary.get("output") or "") == (
            copy.get("output") or ""
        )
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.hincrby(self.store.stats_key, "shadow:matched" if same else "shadow:mismatched", 1)
            pipe.hset(self.store.key(primary["id"]), "shadow_match", "1" if same else "0")
            if not same:
                mismatch = {
                    "eval_id": primary["id"],
                    "systems": [primary.get("queue_system"), copy.get("queue_system")],
                    "statuses": [primary["status"], copy["status"]],
                    "outputs": [(primary.get("output") or "")[:200], (copy.get("output") or "")[:200]],
                }
                key = f"{self.store.ns}:shadow:mismatches"
                pipe.lpush(key, json.dumps(mismatch))
                pipe.ltrim(key, 0, MISMATCHES_KEPT - 1)
            await pipe.execute()
        log.info("migration.shadow_compared", eval_id=primary["id"], matched=same)


def legacy_outcome(state: LegacyState) -> tuple[str, dict[str, Any]]:
    """Our status and result fields for a finished legacy task.

    The legacy task returned a dict like ours (`status`, `output`, `error`, `exit_code`) or
    plain output; a status that is not a final one is a failure saying so; a FAILURE is the
    task's own exception; REVOKED is a cancel.
    """
    if state.state == "REVOKED":
        return "cancelled", {"error": "Cancelled (revoked in the legacy deployment)"}
    if state.state == "FAILURE":
        return "failed", {"error": state.error_text(), "traceback": state.traceback or ""}
    result = state.result
    if not isinstance(result, dict):
        return "completed", {"output": "" if result is None else str(result)}
    fields = {k: result[k] for k in ("output", "error", "exit_code") if result.get(k) is not None}
    status = result.get("status", "completed")
    if status not in TERMINAL:  # e.g. "submitted": the task ended without a final result
        return "failed", {**fields, "error": f"the legacy task ended with status {status!r}"}
    return str(status), fields


def legacy_pending_key(namespace: str) -> str:
    return f"{namespace}:legacy:pending"


def shadow_pending_key(namespace: str) -> str:
    return f"{namespace}:shadow:pending"


async def migration_report(control: MigrationControl, store: EvaluationStore) -> dict[str, Any]:
    """Per system: submitted, final statuses, fallbacks and latency; the split; the shadow score."""
    client = store.client
    async with client.pipeline(transaction=False) as pipe:
        pipe.hgetall(store.stats_key)
        for system in SYSTEMS:
            pipe.lrange(f"{store.ns}:latency:{system}", 0, -1)
        pipe.scard(legacy_pending_key(store.ns))
        pipe.scard(shadow_pending_key(store.ns))
        pipe.lrange(f"{store.ns}:shadow:mismatches", 0, 9)
        stats, *latencies, legacy_pending, shadows_pending, mismatches = await pipe.execute()
    systems: dict[str, Any] = {}
    for system, samples in zip(SYSTEMS, latencies, strict=True):
        ordered = sorted(int(x) for x in samples)
        finals = {s: int(stats.get(f"final:{system}:{s}", 0)) for s in TERMINAL}
        systems[system] = {
            "submitted": int(stats.get(f"submitted:{system}", 0)),
            **finals,
            "finished": sum(finals.values()),
            "taken_over": int(stats.get(f"fallback_to:{system}", 0)),
            "latency_ms": {
                "p50": percentile(ordered, 0.5),
                "p95": percentile(ordered, 0.95),
                "p99": percentile(ordered, 0.99),
                "samples": len(ordered),
            },
        }
    systems["legacy"]["tracking"] = legacy_pending
    matched, mismatched = int(stats.get("shadow:matched", 0)), int(stats.get("shadow:mismatched", 0))
    return {
        "legacy_configured": control.legacy_configured,
        "split": asdict(await control.knobs()),
        "forced_by_environment": control.settings.force_legacy,
        "systems": systems,
        "shadow": {
            "compared": matched + mismatched,
            "matched": matched,
            "mismatched": mismatched,
            "agreement": round(matched / (matched + mismatched), 4) if matched + mismatched else None,
            "waiting": shadows_pending,
            "recent_mismatches": [json.loads(m) for m in mismatches],
        },
    }
