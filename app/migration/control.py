"""Moving traffic from the legacy Celery deployment: the split, its tracker, its report.

The split's knobs (share to Dramatiq, forced rollback, shadow sampling) start from the
environment and can be changed at run time in Redis (`crucible migration set ...`); every
API process reads them again within a second, so no worker or API restarts are needed.
`FORCE_LEGACY_QUEUE=true` in the environment always wins: it is the rollback that needs no
Redis command.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass
from typing import Any

import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError

from evaluations.redis_keys import RedisKeys
from evaluations.status import TERMINAL
from evaluations.store import EvaluationStore
from infra.settings import Settings

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
        self.key = RedisKeys(settings.namespace).migration
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


async def migration_report(control: MigrationControl, store: EvaluationStore) -> dict[str, Any]:
    """Per system: submitted, final statuses, fallbacks and latency; the split; the shadow score."""
    client = store.client
    async with client.pipeline(transaction=False) as pipe:
        pipe.hgetall(store.keys.stats)
        for system in SYSTEMS:
            pipe.lrange(store.keys.latency(system), 0, -1)
        pipe.scard(store.keys.legacy_pending)
        pipe.scard(store.keys.shadow_pending)
        pipe.lrange(store.keys.shadow_mismatches, 0, 9)
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
