"""Brings the legacy Celery deployment's results into our records, and compares shadow runs.

Runs in each API process beside the split (`app/migration/control.py`) and the submitter.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import structlog
from redis.exceptions import RedisError

from app.migration.control import MISMATCHES_KEPT, shadow_id
from app.migration.legacy import LegacyState
from app.migration.route import LegacyRoute
from app.submission import Submitter
from evaluations.queue import task_id_of
from evaluations.status import LEGACY_FINISH, START, TERMINAL, Status
from evaluations.store import EvaluationStore, StatusChange, utc_now

log = structlog.get_logger(__name__)


class MigrationTracker:
    """Brings the legacy system's results into our records, and compares shadow runs.

    Runs in each API process; every step is guarded (status transitions, SREM), so two
    processes tracking at once count each result once.
    """

    def __init__(self, store: EvaluationStore, route: LegacyRoute, submitter: Submitter) -> None:
        self.store = store
        self.client = store.client
        self.route = route
        self.legacy = route.legacy
        self.submitter = submitter
        self.pending_key = store.keys.legacy_pending
        self.shadows_key = store.keys.shadow_pending

    async def run(self, interval: float = 0.5) -> None:
        """Track until cancelled; no error ends it (Redis may be away, a result may be odd)."""
        while True:
            try:
                await self.tick()
            except Exception as exc:
                log.warning("migration.track_failed", error=f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(interval)

    async def tick(self) -> None:
        await self.route.record_unrecorded(self.submitter)
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
            await self.store.transition(eval_id, Status.RUNNING, START.allowed_from, started_at=utc_now())
            return
        if state.state not in ("SUCCESS", "FAILURE", "REVOKED"):
            return
        status, fields = legacy_outcome(state)
        fields["completed_at"] = utc_now()
        change = StatusChange.by(LEGACY_FINISH, eval_id, status, fields, at_ms=state.done_ms)
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
            pipe.hincrby(self.store.keys.stats, "shadow:matched" if same else "shadow:mismatched", 1)
            pipe.hset(self.store.keys.record(primary["id"]), "shadow_match", "1" if same else "0")
            if not same:
                mismatch = {
                    "eval_id": primary["id"],
                    "systems": [primary.get("queue_system"), copy.get("queue_system")],
                    "statuses": [primary["status"], copy["status"]],
                    "outputs": [(primary.get("output") or "")[:200], (copy.get("output") or "")[:200]],
                }
                key = self.store.keys.shadow_mismatches
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
