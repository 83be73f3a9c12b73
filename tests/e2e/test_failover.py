"""A real Redis fail-over under load: primary, two replicas and three Sentinels (bench/ha.py),
an API and a worker following them (REDIS_SENTINELS, CRUCIBLE_REDIS_MIN_REPLICAS=1). The
primary is SIGKILLed while submissions keep coming; every submission answered 200 must finish.
Run alone with `-m failover -s` (it prints its counts)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import ExitStack

import httpx
import pytest
import redis.asyncio as aioredis

from bench.ha import ha_redis
from bench.stack import process
from tests.conftest import stack_env, start_api
from tests.helpers import TERMINAL, api_client

pytestmark = pytest.mark.failover

#: submissions go out this often, one at a time
PACE_S = 0.05
#: submitting goes on this long before the kill, and this long after service came back
BEFORE_S, AFTER_S = 2.0, 3.0


async def test_a_primary_killed_under_load_loses_no_accepted_submission(executor_url: str) -> None:
    namespace = f"crucible-failover-{uuid.uuid4().hex[:6]}"
    with ha_redis(replicas=2) as ha, ExitStack() as stack:
        env = stack_env(
            f"redis://127.0.0.1:{ha.primary_port}/0", namespace, executor_url, **ha.env(),
            CRUCIBLE_REDIS_MIN_REPLICAS="1", CELERY_CONCURRENCY="1", CRUCIBLE_WORKER_THREADS="4",
        )  # fmt: skip
        env.pop("REDIS_URL")  # the Sentinels alone say where Redis is
        api = start_api(stack, "failover", env)
        stack.enter_context(process("failover-worker", "worker", api.env))
        accepted: list[str] = []
        refused: dict[str, int] = {}
        answered_at: list[float] = []  # when each 200 came
        async with api_client(api.api_url) as client:
            client.timeout = httpx.Timeout(15)
            started = time.monotonic()
            killed_at = None
            n = 0
            while True:
                now = time.monotonic()
                if killed_at is None and now - started >= BEFORE_S:
                    ha.kill("primary")
                    killed_at = time.monotonic()
                back = [t for t in answered_at if killed_at and t > killed_at]
                if (back and now - back[0] >= AFTER_S) or (killed_at and now - killed_at > 30):
                    break
                eval_id = f"fo-{n}-{uuid.uuid4().hex[:6]}"
                n += 1
                try:
                    response = await client.post(
                        "/api/eval", json={"eval_id": eval_id, "code": f"print({n})"}
                    )
                    outcome = str(response.status_code)
                except httpx.HTTPError as exc:
                    outcome = type(exc).__name__
                if outcome == "200":
                    accepted.append(eval_id)
                    answered_at.append(time.monotonic())
                else:
                    refused[outcome] = refused.get(outcome, 0) + 1
                await asyncio.sleep(PACE_S)
            assert killed_at is not None
            after = [t for t in answered_at if t > killed_at]
            before = [t for t in answered_at if t <= killed_at]
            outage_s = (after[0] if after else time.monotonic()) - (before[-1] if before else started)
            # every accepted one must finish
            finals: dict[str, str] = {}
            deadline = time.monotonic() + 40
            pending = list(accepted)
            while pending and time.monotonic() < deadline:
                for eval_id in list(pending):
                    response = await client.get(f"/api/eval/{eval_id}")
                    if response.status_code == 200 and response.json()["status"] in TERMINAL:
                        finals[eval_id] = response.json()["status"]
                        pending.remove(eval_id)
                    elif response.status_code == 404:
                        finals[eval_id] = "missing"
                        pending.remove(eval_id)
                if pending:
                    await asyncio.sleep(0.2)
        master = ha.master_port()
        reader = aioredis.Redis(port=master, decode_responses=True)
        twice = 0
        for eval_id in accepted:
            events = [json.loads(e) for e in await reader.lrange(f"{namespace}:eval:{eval_id}:events", 0, -1)]
            twice += sum(e["status"] == "running" for e in events) > 1
        await reader.aclose()
    lost = [i for i in accepted if finals.get(i) in (None, "missing")]
    counts = {
        "submitted": n,
        "accepted": len(accepted),
        "refused": refused,
        "lost": len(lost),
        "completed": sum(s == "completed" for s in finals.values()),
        "other_final": sorted({s for s in finals.values() if s not in ("completed", "missing")}),
        "run_twice": twice,
        "seconds_without_service": round(outage_s, 2),
        "new_master_is_a_replica": master in ha.replica_ports,
    }
    print(f"\nfail-over: {json.dumps(counts)}")
    assert master in ha.replica_ports, counts
    assert after, f"no submission accepted after the fail-over: {counts}"
    assert not lost, f"accepted but lost: {lost[:5]} {counts}"
    assert counts["completed"] == len(accepted), counts
