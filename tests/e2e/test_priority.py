"""Strict priority: with every slot busy, the next free slot takes high, then default, then low."""

from __future__ import annotations

import asyncio
from contextlib import ExitStack

import httpx
import pytest

from tests.conftest import stack_env, start_stack
from tests.helpers import api_client, submit, wait_final


async def wait_running(api: httpx.AsyncClient, eval_id: str) -> None:
    for _ in range(400):
        if (await api.get(f"/api/eval/{eval_id}")).json()["status"] == "running":
            return
        await asyncio.sleep(0.025)
    raise AssertionError(f"{eval_id} never started")


@pytest.mark.parametrize(("processes", "threads"), [(1, 1), (2, 2)])
async def test_high_submitted_last_starts_next_and_default_before_low(
    redis_url: str, executor_url: str, namespace: str, processes: int, threads: int
) -> None:
    env = stack_env(
        redis_url,
        namespace,
        executor_url,
        CELERY_CONCURRENCY=str(processes),
        CRUCIBLE_WORKER_THREADS=str(threads),
    )
    with ExitStack() as stack:
        s = start_stack(stack, f"priority-{processes}x{threads}", env)
        async with api_client(s.api_url) as api:
            # One blocker ends first; the others hold their slots until the backlog has drained
            # through that one slot, so start times show the order in which it fetched.
            slots = processes * threads
            sleeps = [3] + [8] * (slots - 1)
            blockers = [await submit(api, f"import time; time.sleep({s})") for s in sleeps]
            for blocker in blockers:
                await wait_running(api, blocker)

            batch = await api.post(
                "/api/eval-batch", json={"evaluations": [{"code": f"print('low {i}')"} for i in range(4)]}
            )
            lows = [e["eval_id"] for e in batch.json()["evaluations"]]
            defaults = [await submit(api, f"print('default {i}')") for i in range(4)]
            high = await submit(api, "print('high')", priority=True)

            backlog = [high, *defaults, *lows]
            results = {i: await wait_final(api, i) for i in backlog}
            first_free = min([(await wait_final(api, b))["completed_at"] for b in blockers])
            assert results[high]["created_at"] < first_free, "backlog was not queued before a slot freed"
            assert all(r["status"] == "completed" for r in results.values())
            assert results[high]["queue"] == "high"
            assert {results[i]["queue"] for i in defaults} == {"default"}

            by_start = sorted(backlog, key=lambda i: results[i]["started_at"])
            # One slot frees first: it must take the high task although it was submitted last.
            assert by_start[0] == high
            # Every default starts before any low, and each level keeps its submission order.
            starts = [results[i]["started_at"] for i in backlog]
            assert max(starts[1:5]) <= min(starts[5:])
            assert [i for i in by_start if i in defaults] == defaults
            assert [i for i in by_start if i in lows] == lows
