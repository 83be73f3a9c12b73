"""The scheduler: periodiq ticks run once however many schedulers send them; cleanup is idempotent."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from contextlib import ExitStack

import pytest
import redis.asyncio as aioredis
from dramatiq.message import Message

from actors.broker import PriorityBroker
from bench.stack import process
from evaluations.queue import QUEUE_NAME
from evaluations.store import EvaluationStore, NewEvaluation
from tests.conftest import stack_env, start_stack

DAY_MS = 86_400_000


def ready(broker: PriorityBroker) -> int:
    sizes = broker.queue_sizes()
    return sizes["high"] + sizes["default"] + sizes["low"]


def cleanup_tick(**options: str) -> Message:
    """The message periodiq sends for the cleanup actor (its options name the tick)."""
    return Message(QUEUE_NAME, "cleanup_old_evaluations", (), {}, options)


def test_the_same_tick_from_two_schedulers_is_enqueued_once(redis_url: str, namespace: str) -> None:
    first, second = (PriorityBroker(url=redis_url, namespace=namespace) for _ in range(2))
    try:
        # Two schedulers started at different seconds of the same minute stamp the tick differently.
        first.enqueue(cleanup_tick(scheduled_at="2026-11-24T13:00:00+00:00"))
        second.enqueue(cleanup_tick(scheduled_at="2026-11-24T14:00:07+01:00"))
        assert ready(first) == 1
        second.enqueue(cleanup_tick(scheduled_at="2026-11-24T13:01:00+00:00"))
        first.enqueue(cleanup_tick())  # sent by hand: never deduplicated
        assert ready(first) == 3
    finally:
        first.client.close()
        second.client.close()


async def plant(store: EvaluationStore, eval_id: str, age_ms: int, status: str = "completed") -> None:
    async with store.client.pipeline(transaction=True) as pipe:
        store.write_new(pipe, NewEvaluation(eval_id, "print(1)", "python", 5, "default", False, {}))
        await pipe.execute()
    if status != "queued":
        await store.transition(eval_id, status, ("queued",))
    created = int(time.time() * 1000) - age_ms
    await store.client.zadd(f"{store.ns}:evals", {eval_id: created})
    await store.client.zadd(f"{store.ns}:evals:{status}", {eval_id: created})


async def test_cleanup_is_idempotent_when_two_run_at_once(aredis: aioredis.Redis, namespace: str) -> None:
    store = EvaluationStore(aredis, namespace, retention_seconds=24 * 3600)
    for n in range(30):
        await plant(store, f"old-{n}", 2 * DAY_MS, status=("completed", "failed", "cancelled")[n % 3])
    await plant(store, "fresh", 0)
    await plant(store, "old-but-waiting", 2 * DAY_MS, status="queued")  # not finished: kept
    removed = await asyncio.gather(store.cleanup(), store.cleanup())
    assert sum(removed) == 30  # each record counted once, by the call that deleted it
    assert await store.cleanup() == 0
    assert await store.get("old-0") is None and await store.events("old-0") == []
    assert sorted(await aredis.zrange(f"{namespace}:evals", 0, -1)) == ["fresh", "old-but-waiting"]
    assert await aredis.zrange(f"{namespace}:evals:completed", 0, -1) == ["fresh"]
    assert await store.get("old-but-waiting") is not None


@pytest.mark.timeout(200)
async def test_two_running_schedulers_run_each_tick_once(
    redis_url: str, executor_url: str, namespace: str, aredis: aioredis.Redis
) -> None:
    store = EvaluationStore(aredis, namespace, retention_seconds=24 * 3600)
    await plant(store, "expired", 2 * DAY_MS)
    await plant(store, "recent", 0)
    await plant(store, "stuck", 2 * DAY_MS, status="queued")
    await aredis.zadd(f"{namespace}:dlq", {"celery-ancient": time.time() * 1000 - 40 * DAY_MS})
    await aredis.hset(f"{namespace}:dlq:entries", "celery-ancient", json.dumps({"task_id": "celery-ancient"}))

    every_minute = {"CRUCIBLE_CLEANUP_CRON": "* * * * *", "CRUCIBLE_DLQ_MONITOR_CRON": "* * * * *"}
    env = stack_env(redis_url, namespace, executor_url, **every_minute)
    runs_key = f"{namespace}:scheduler:runs"
    with ExitStack() as stack:
        start_stack(stack, "scheduler", env)
        stack.enter_context(process("scheduler-1", "scheduler", env))
        stack.enter_context(process("scheduler-2", "scheduler", env))
        deadline = time.monotonic() + 130
        while True:
            runs = [json.loads(r) for r in await aredis.lrange(runs_key, 0, -1)]
            if {r["actor"] for r in runs} == {"cleanup_old_evaluations", "monitor_dead_letter_queue"}:
                break
            assert time.monotonic() < deadline, runs
            await asyncio.sleep(0.5)
        await asyncio.sleep(3)  # room for a duplicate to show up
        runs = [json.loads(r) for r in await aredis.lrange(runs_key, 0, -1)]
        schedulers = await aredis.zrange(f"{namespace}:schedulers", 0, -1)

    per_tick = Counter((r["actor"], r["scheduled_at"][:16]) for r in runs)
    assert set(per_tick.values()) == {1}, runs
    assert len(schedulers) == 2
    first_cleanup = next(r for r in reversed(runs) if r["actor"] == "cleanup_old_evaluations")
    assert first_cleanup["removed"] == 1 and first_cleanup["dead_letters_removed"] == 1
    assert await store.get("expired") is None and await store.get("recent") is not None
    assert (await store.get("stuck"))["status"] == "queued"
    assert await aredis.hget(f"{namespace}:dlq:entries", "celery-ancient") is None
