"""Evaluation records: guarded status changes, retention clean-up."""

from __future__ import annotations

import time

import redis.asyncio as aioredis

from evaluations.store import EvaluationStore, NewEvaluation


async def create(store: EvaluationStore, eval_id: str) -> None:
    async with store.client.pipeline(transaction=True) as pipe:
        store.write_new(pipe, NewEvaluation(eval_id, "print(1)", "python", 5, "default", False, {}))
        await pipe.execute()


async def test_final_status_is_set_once(aredis: aioredis.Redis, namespace: str) -> None:
    store = EvaluationStore(aredis, namespace, retention_seconds=3600)
    await create(store, "e1")
    assert await store.transition("e1", "running", ("queued",)) == (True, "running")
    assert await store.transition("e1", "completed", ("running",), output="1\n") == (True, "completed")
    # a late cancel, or a redelivered run, cannot overwrite the final status
    assert await store.transition("e1", "cancelled", ("queued", "running")) == (False, "completed")
    assert await store.transition("e1", "running", ("queued", "running")) == (False, "completed")
    record = await store.get("e1")
    assert record["status"] == "completed" and record["output"] == "1\n"
    assert [e["status"] for e in await store.events("e1")] == ["queued", "running", "completed"]
    assert await store.transition("missing", "running", ("queued",)) == (False, None)


async def test_status_index_follows_the_record(aredis: aioredis.Redis, namespace: str) -> None:
    store = EvaluationStore(aredis, namespace, retention_seconds=3600)
    for eval_id in ("a", "b", "c"):
        await create(store, eval_id)
    await store.transition("b", "running", ("queued",))
    queued, total = await store.list(limit=10, offset=0, status="queued")
    assert [r["id"] for r in queued] == ["c", "a"] and total == 2
    running, _ = await store.list(limit=10, offset=0, status="running")
    assert [r["id"] for r in running] == ["b"]


async def test_cleanup_removes_only_expired_finished_evaluations_and_is_idempotent(
    aredis: aioredis.Redis, namespace: str
) -> None:
    store = EvaluationStore(aredis, namespace, retention_seconds=3600)
    two_hours_ago = (time.time() - 7200) * 1000
    for eval_id, status in (("old", "completed"), ("old-running", "running")):
        await create(store, eval_id)
        await store.transition(eval_id, "running", ("queued",))
        if status == "completed":
            await store.transition(eval_id, "completed", ("running",))
        await aredis.zadd(f"{namespace}:evals", {eval_id: two_hours_ago})
        await aredis.zadd(f"{namespace}:evals:{status}", {eval_id: two_hours_ago})
    await create(store, "new")
    assert await store.cleanup() == 1
    assert await store.cleanup() == 0
    assert await store.get("old") is None and await store.events("old") == []
    assert await store.get("new") is not None
    assert (await store.get("old-running"))["status"] == "running"  # unfinished work is never removed
    everything, total = await store.list(limit=10, offset=0)
    assert [r["id"] for r in everything] == ["new", "old-running"] and total == 2
    assert await aredis.zcard(f"{namespace}:evals:completed") == 0


async def test_only_the_current_attempt_may_write_the_result(aredis: aioredis.Redis, namespace: str) -> None:
    store = EvaluationStore(aredis, namespace, retention_seconds=3600)
    await create(store, "e2")
    await store.transition("e2", "running", ("queued",), attempt="first")
    await store.transition("e2", "running", ("running",), attempt="second")  # redelivered
    assert await store.transition("e2", "failed", ("running",), expect={"attempt": "first"}) == (
        False,
        "running",
    )
    assert await store.transition("e2", "completed", ("running",), expect={"attempt": "second"}) == (
        True,
        "completed",
    )


async def test_shedding_takes_the_oldest_finished_first_and_never_unfinished_work(
    aredis: aioredis.Redis, namespace: str
) -> None:
    store = EvaluationStore(aredis, namespace, retention_seconds=24 * 3600)
    two_hours_ago = (time.time() - 7200) * 1000
    ids = ["old-queued", "old-running", "old-hooked", "old-1", "old-2", "old-3", "young"]
    for n, eval_id in enumerate(ids):
        await create(store, eval_id)
        if eval_id == "old-hooked":  # its webhook is still to be sent
            await aredis.hset(
                store.key(eval_id), mapping={"callback_url": "https://x.test/", "callback_status": "due"}
            )
        if eval_id != "old-queued":
            await store.transition(eval_id, "running", ("queued",))
        if eval_id not in ("old-queued", "old-running"):
            await store.transition(eval_id, "completed", ("running",), output="ü" * 30, error="e" * 10)
        status = (await store.get(eval_id))["status"]
        score = two_hours_ago + n if eval_id != "young" else time.time() * 1000
        await aredis.zadd(f"{namespace}:evals", {eval_id: score})
        await aredis.zadd(f"{namespace}:evals:{status}", {eval_id: score})
    step = await store.shed(3600, trim_bytes=25, limit=2)
    assert (step.removed, step.trimmed) == (2, 0)  # old-hooked is passed over
    assert await store.get("old-1") is None and await store.get("old-2") is None
    assert await store.events("old-1") == [] and (await store.get("old-3"))["status"] == "completed"
    assert (await store.shed(3600, trim_bytes=25, limit=2)).removed == 1
    # nothing old enough left: outputs are trimmed instead (ü is 2 bytes: cut to 24, not 25)
    step = await store.shed(3600, trim_bytes=25, limit=2)
    assert (step.removed, step.trimmed, step.bytes_trimmed, step.more) == (0, 2, 72, True)
    young = await store.get("young")
    assert young["output"] == "ü" * 12 and young["output_truncated"] and young["error"] == "e" * 10
    assert not (await store.shed(3600, trim_bytes=25, limit=2)).progressed
    assert (await store.get("old-queued"))["status"] == "queued"
    assert (await store.get("old-running"))["status"] == "running"
    assert (await store.get("old-hooked"))["output"] == "ü" * 12
    assert await aredis.hget(f"{namespace}:stats", "shed:removed") == "3"
