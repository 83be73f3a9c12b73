"""A full store degrades gracefully: finished evaluations past the minimum retention are shed,
oldest first, then outputs trimmed, and only then are submissions refused; unfinished work is
never shed."""

from __future__ import annotations

import time
from contextlib import ExitStack

import redis.asyncio as aioredis

from bench.stack import redis_server
from evaluations.status import TERMINAL
from evaluations.store import EvaluationStore, NewEvaluation, StatusChange
from tests.conftest import stack_env, start_api
from tests.helpers import api_client

MAXMEMORY = 16 * 2**20
NS = "full-store"


async def write(
    store: EvaluationStore, ids: list[str], status: str, *, age_s: float, output: str = ""
) -> None:
    """Records in `status` (queued, running or completed) created `age_s` ago, in the order given."""
    async with store.client.pipeline(transaction=False) as pipe:
        for eval_id in ids:
            store.write_new(pipe, NewEvaluation(eval_id, "print('x')", "python", 5, "default", False, {}))
            if status != "queued":
                await store.transition_in(pipe, StatusChange(eval_id, "running", ("queued",), {}))
            if status == "completed":
                fields = {"output": output, "exit_code": 0, "runtime_ms": 12.5}
                await store.transition_in(pipe, StatusChange(eval_id, "completed", ("running",), fields))
        await pipe.execute()
    created_ms = (time.time() - age_s) * 1000
    async with store.client.pipeline(transaction=False) as pipe:
        for n, eval_id in enumerate(ids):  # one ms apart: their order is their age
            pipe.zadd(store.keys.evaluations, {eval_id: created_ms + n})
            pipe.zadd(store.keys.by_status(status), {eval_id: created_ms + n})
        await pipe.execute()


async def used_share(client: aioredis.Redis) -> float:
    info = await client.info("memory")
    return info["used_memory"] / info["maxmemory"]


async def test_a_full_store_sheds_old_finished_evaluations_before_refusing_work(executor_url: str) -> None:
    with redis_server() as url, ExitStack() as stack:
        client = aioredis.Redis.from_url(url, decode_responses=True)
        await client.config_set("maxmemory-policy", "noeviction")
        await client.config_set("maxmemory", MAXMEMORY)
        store = EvaluationStore(client, NS, retention_seconds=24 * 3600)
        # unfinished work older than anything else (a stuck run, a long queue): never shed
        stuck_running = [f"running-{n:03}" for n in range(20)]
        stuck_queued = [f"queued-{n:03}" for n in range(20)]
        await write(store, stuck_running, "running", age_s=7300)
        await write(store, stuck_queued, "queued", age_s=7250)
        # finished within the minimum retention: kept, only their outputs trimmed
        young = [f"young-{n:03}" for n in range(50)]
        await write(store, young, "completed", age_s=60, output="é" * 2000)  # 4000 bytes
        # finished two hours ago, oldest first: what goes first
        old: list[str] = []
        while await used_share(client) < 0.85:
            batch = [f"old-{n:05}" for n in range(len(old), len(old) + 200)]
            await write(store, batch, "completed", age_s=7200 - len(old) / 1000, output="hello world\n" * 100)
            old += batch
        assert len(old) > 1000

        env = stack_env(
            url, NS, executor_url, CRUCIBLE_MIN_RETENTION_S="600", CRUCIBLE_SHED_OUTPUT_BYTES="1000",
            CRUCIBLE_REDIS_SHED_SHARE="0.8", CRUCIBLE_REDIS_FULL_SHARE="0.9",
            CRUCIBLE_RATE_LIMITS='{"admin": {"per_second": 10000, "burst": 10000}}',
        )  # fmt: skip
        api = start_api(stack, "full-store-api", env)  # no workers: what it accepts stays queued
        accepted: list[str] = []
        shed_in_order = False
        async with api_client(api.api_url) as caller:
            for n in range(3000):
                response = await caller.post("/api/eval", json={"code": f"print({n})  # " + "x" * 1000})
                if response.status_code != 200:
                    break
                accepted.append(response.json()["eval_id"])
                if n % 50 == 0:
                    left = await client.zrange(store.keys.by_status("completed"), 0, -1)
                    left_old = [i for i in left if i.startswith("old-")]
                    # what was shed is always the oldest: what is left is the newest part
                    assert left_old == old[len(old) - len(left_old) :]
                    shed_in_order |= 0 < len(left_old) < len(old)
            else:
                raise AssertionError("submissions were never refused")
            health = (await caller.get("/health")).json()
            metrics = (await caller.get("/metrics")).text

        # refused only once nothing was left to shed, with a clear answer
        assert response.status_code == 503, response.text
        assert response.headers["Retry-After"] == "60"
        body = response.json()
        assert "storage nearly full" in body["error"] and "nothing left to shed" in body["error"]
        assert body["details"]["reason"] == "storage_full"
        assert shed_in_order and len(accepted) > 100
        assert not [i for i in await client.zrange(store.keys.evaluations, 0, -1) if i.startswith("old-")]
        assert await client.exists(*(store.keys.record(i) for i in old)) == 0
        assert await client.exists(*(store.keys.timeline(i) for i in old)) == 0
        # every unfinished evaluation is there, and every young finished one, its output trimmed
        for eval_id in stuck_running:
            assert (await store.get(eval_id))["status"] == "running"
        for eval_id in [*stuck_queued, *accepted]:
            assert (await store.get(eval_id))["status"] == "queued"
        assert await client.zcard(store.keys.by_status("queued")) == len(stuck_queued) + len(accepted)
        for eval_id in young:
            record = await store.get(eval_id)
            assert record["status"] == "completed" and record["output_truncated"]
            assert record["output"] == "é" * 500  # 1000 bytes, cut between characters
        counted = int(await client.hget(store.keys.stats, "shed:removed"))
        assert counted == len(old) and int(await client.hget(store.keys.stats, "shed:trimmed")) == len(young)
        assert health["redis_memory"]["shed_evaluations"] == len(old)
        assert f'crucible_storage_shed_total{{kind="evaluation_removed"}} {float(len(old))}' in metrics
        # no final status of an unfinished one was ever written by shedding
        for status in TERMINAL:
            finished = set(await client.zrange(store.keys.by_status(status), 0, -1))
            assert not finished & {*stuck_running, *stuck_queued, *accepted}
        await client.aclose()
