"""The split's knobs and the reading of legacy results, without a stack."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime

import redis.asyncio as aioredis

from app.migration.control import MigrationControl
from app.migration.legacy import LegacyState
from app.migration.tracker import legacy_outcome
from infra.settings import get_settings


async def test_runtime_values_override_the_environment_and_the_env_rollback_wins(
    aredis: aioredis.Redis, namespace: str
) -> None:
    settings = dataclasses.replace(get_settings(), namespace=namespace, dramatiq_share=0.1)
    control = MigrationControl(aredis, settings, legacy_configured=True)
    assert (await control.knobs()).dramatiq_share == 0.1
    await control.set(dramatiq_share=1.0)
    assert (await control.knobs()).dramatiq_share == 1.0
    assert {await control.choose() for _ in range(50)} == {"dramatiq"}
    await control.set(force_legacy=True)
    assert {await control.choose() for _ in range(50)} == {"legacy"}
    await control.reset()
    assert (await control.knobs()).dramatiq_share == 0.1 and not (await control.knobs()).force_legacy

    forced = MigrationControl(
        aredis, dataclasses.replace(settings, force_legacy=True), legacy_configured=True
    )
    await forced.set(force_legacy=False, dramatiq_share=1.0)
    assert {await forced.choose() for _ in range(20)} == {"legacy"}

    unconfigured = MigrationControl(aredis, settings, legacy_configured=False)
    assert {await unconfigured.choose() for _ in range(20)} == {"dramatiq"}


def meta(status: str, result: object, traceback: str | None = None) -> LegacyState:
    done = "2026-11-24T10:00:00.500000"  # Celery writes UTC, with or without an offset
    fields = {"status": status, "result": result, "traceback": traceback, "date_done": done}
    return LegacyState.from_meta(json.dumps(fields))


def test_legacy_results_map_to_our_statuses() -> None:
    done = meta("SUCCESS", {"status": "timeout", "output": "partial", "error": "", "exit_code": None})
    assert legacy_outcome(done) == ("timeout", {"output": "partial", "error": ""})
    assert done.done_ms == datetime(2026, 11, 24, 10, 0, 0, 500000, tzinfo=UTC).timestamp() * 1000
    assert legacy_outcome(meta("SUCCESS", "plain output")) == ("completed", {"output": "plain output"})
    crash = meta("FAILURE", {"exc_type": "RuntimeError", "exc_message": ["boom"]}, "Traceback ...")
    assert legacy_outcome(crash) == ("failed", {"error": "RuntimeError: boom", "traceback": "Traceback ..."})
    assert legacy_outcome(meta("REVOKED", None))[0] == "cancelled"
    unfinished = legacy_outcome(meta("SUCCESS", {"status": "submitted", "output": ""}))
    assert unfinished == ("failed", {"output": "", "error": "the legacy task ended with status 'submitted'"})
