"""Retries, the dead-letter queue and cancellation, end to end with real workers and executors."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import ExitStack, asynccontextmanager

import httpx
import redis.asyncio as aioredis

from bench.stack import LOG_DIR, free_port, process, wait_http
from evaluations.api_keys import KeyStore
from evaluations.retry_policies import with_overrides
from infra.redis_client import POOL_SIZE, async_client
from tests.conftest import Stack, stack_env, start_stack
from tests.helpers import TERMINAL, api_client, executor_client, submit, wait_final

FAST_NETWORK_RETRIES = json.dumps({"network_error": {"base_delay": 0.5, "max_delay": 1, "max_retries": 2}})


@asynccontextmanager
async def stack_and_client(
    stack: ExitStack, name: str, env: dict[str, str]
) -> AsyncIterator[httpx.AsyncClient]:
    s: Stack = start_stack(stack, name, env)
    async with api_client(s.api_url) as client:
        yield client


async def wait_for(api: httpx.AsyncClient, eval_id: str, predicate, seconds: float = 30) -> dict:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        body = (await api.get(f"/api/eval/{eval_id}")).json()
        if predicate(body):
            return body
        await asyncio.sleep(0.05)
    raise AssertionError(f"condition not met for {eval_id}: {body}")


def start_executor(stack: ExitStack, name: str, port: int) -> str:
    stack.enter_context(process(name, "executor", {"EXECUTOR_PORT": str(port), "LOG_FORMAT": "json"}))
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/health")
    return url


async def test_executor_down_retries_under_network_error_then_finishes(
    redis_url: str, namespace: str
) -> None:
    port = free_port()
    network = {"base_delay": 1, "max_delay": 1.5, "max_retries": 5}
    policies = json.dumps({"network_error": network, "gentle": {"max_retries": 1}})
    env = stack_env(redis_url, namespace, f"http://127.0.0.1:{port}", CRUCIBLE_RETRY_POLICIES=policies)
    with ExitStack() as stack:
        async with stack_and_client(stack, "retry-network", env) as api:
            # the API process and every worker started with these overrides report one table
            expected = with_overrides(policies)
            deadline = time.monotonic() + 20
            while True:  # until the workers' first heartbeats are in
                status = (await api.get("/api/celery-status")).json()
                workers = [w for w in status["worker_stats"].values() if w["online"]]
                if len(workers) == 2 or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.2)
            assert status["retry_policies"] == expected and expected["gentle"]["max_retries"] == 1
            assert workers and all(w["retry_policies"] == expected for w in workers)
            show = "import json, retry_config; print(json.dumps(retry_config.RETRY_POLICIES))"
            shim = subprocess.run([sys.executable, "-c", show], env={**os.environ, **env},
                                  capture_output=True, text=True, timeout=60)  # fmt: skip
            assert json.loads(shim.stdout) == expected, shim.stderr
            eval_id = await submit(api, "print('after the outage')")
            waiting = await wait_for(api, eval_id, lambda b: b["retries"] >= 1)
            assert waiting["status"] == "running"
            assert waiting["celery_state"] == "RETRY" and waiting["retrying"] is True
            assert waiting["next_retry_at"] and "ExecutorUnavailable" in waiting["error"]
            start_executor(stack, "retry-network-executor", port)
            result = await wait_final(api, eval_id, seconds=30)
            metrics = (await api.get("/metrics")).text
    retried = re.search(r'^crucible_retries_total\{policy="network_error"\} (\S+)$', metrics, re.M)
    assert retried and float(retried.group(1)) == result["retries"]
    assert re.search(r'^crucible_retries_total\{policy="gentle"\} 0\.0$', metrics, re.M)
    for named in ("aggressive", "conservative", "quota_exceeded"):  # the original's other policies
        assert re.search(rf'^crucible_retries_total\{{policy="{named}"\}} 0\.0$', metrics, re.M)
    assert result["status"] == "completed" and result["output"] == "after the outage\n"
    assert result["retries"] >= 1 and result["celery_state"] == "SUCCESS" and result["next_retry_at"] is None
    log = (LOG_DIR / "retry-network-worker.log").read_text()
    assert f"Task evaluate_code for evaluation {eval_id} failed: ExecutorUnavailable" in log
    assert "Retry 1/5 in " in log


async def test_a_failure_of_ours_shows_its_submitter_its_kind_but_no_internal_address(
    redis_url: str, namespace: str, aredis: aioredis.Redis
) -> None:
    port = free_port()  # nothing listens: every attempt fails with ExecutorUnavailable
    url = f"http://127.0.0.1:{port}"
    env = stack_env(redis_url, namespace, url, CRUCIBLE_RETRY_POLICIES=FAST_NETWORK_RETRIES)
    _, secret = await KeyStore(aredis, namespace).create("internal-error", "standard")
    with ExitStack() as stack:
        async with stack_and_client(stack, "internal", env) as admin:
            async with api_client(str(admin.base_url), key=secret) as user:
                eval_id = await submit(user, "print('never runs')")
                seen = await wait_final(user, eval_id)
                timeline = (await user.get(f"/api/eval/{eval_id}/timeline")).json()["events"]
                events = (await user.get(f"/api/eval/{eval_id}/events")).text
                full = (await admin.get(f"/api/eval/{eval_id}")).json()
    assert seen["status"] == "failed" and seen["internal_error"] is True
    assert seen["error"] == (
        "ExecutorUnavailable: the service failed to run this evaluation (not the program's fault)"
    )
    assert "executor" not in seen and "worker" not in seen
    assert [e["status"] for e in timeline][-1] == "failed" and all("worker" not in e for e in timeline)
    for shown in (json.dumps(seen), json.dumps(timeline), events):
        assert f":{port}" not in shown  # no executor address anywhere the submitter looks
    # an operator sees it all
    assert f"127.0.0.1:{port}" in full["error"] and full["worker"] and full["executor"] is None


async def test_dead_letters_keep_the_final_failure_and_can_be_retried(redis_url: str, namespace: str) -> None:
    port = free_port()
    env = stack_env(
        redis_url,
        namespace,
        f"http://127.0.0.1:{port}",
        CRUCIBLE_RETRY_POLICIES=FAST_NETWORK_RETRIES,
        CRUCIBLE_MAX_TIMEOUT="100",  # the API allows more than the executor: it answers 422
    )
    with ExitStack() as stack:
        async with stack_and_client(stack, "dlq", env) as api:
            eval_id = await submit(api, "print('second chance')")
            failed = await wait_final(api, eval_id)
            assert failed["status"] == "failed" and failed["celery_state"] == "FAILURE"
            assert failed["error"].startswith("ExecutorUnavailable")
            assert failed["internal_error"] is True  # not the program's failure

            listing = (await api.get("/api/dlq/tasks", params={"eval_id": eval_id})).json()
            assert listing["count"] == 1
            entry = (await api.get(f"/api/dlq/tasks/celery-{eval_id}")).json()
            assert entry["task_id"] == f"celery-{eval_id}" and entry["task_name"] == "evaluate_code"
            assert entry["eval_id"] == eval_id
            assert entry["kwargs"]["code"] == "print('second chance')"
            assert entry["exception_class"] == "ExecutorUnavailable"
            assert "Traceback (most recent call last)" in entry["traceback"]
            assert "ExecutorUnavailable" in entry["traceback"].strip().splitlines()[-1]
            assert entry["retry_count"] == 2
            assert entry["first_failure_time"] < entry["last_failure_time"]
            assert entry["metadata"] == {
                "code_preview": "print('second chance')",
                "language": "python",
                "queue": "default",
            }
            assert "message" not in entry

            start_executor(stack, "dlq-executor", port)
            # a 4xx from the executor is not retried: straight to the DLQ
            rejected = await submit(api, "print(1)", timeout=90)
            assert (await wait_final(api, rejected))["status"] == "failed"
            stats = (await api.get("/api/dlq/statistics")).json()
            assert stats["queue_size"] == 2
            assert stats["exception_breakdown"] == {"ExecutorUnavailable": 1, "ExecutorHTTPError": 1}
            assert stats["task_breakdown"] == {"evaluate_code": 2}
            assert (await api.get(f"/api/dlq/tasks/celery-{rejected}")).json()["retry_count"] == 0

            retried = await api.post(f"/api/dlq/tasks/celery-{eval_id}/retry")
            task = f"celery-{eval_id}"
            assert retried.json() == {
                "status": "success",
                "message": f"Task {task} re-queued",
                "task_id": task,
            }
            result = await wait_final(api, eval_id)
            assert result["status"] == "completed" and result["output"] == "second chance\n"
            assert result["internal_error"] is False
            assert result["retries"] == 0 and result["error"] is None
            missing = await api.get(f"/api/dlq/tasks/celery-{eval_id}")
            assert missing.status_code == 404 and missing.json()["error"] == "Task not found in DLQ"

            batch = await api.post("/api/dlq/tasks/retry-batch", json=[f"celery-{rejected}", "celery-nope"])
            assert batch.json()["total"] == 2 and batch.json()["succeeded"] == 1
            assert batch.json()["results"]["failed"] == [
                {"task_id": "celery-nope", "error": "Task not found in DLQ"}
            ]
            assert (await wait_final(api, rejected))["status"] == "failed"  # fails again, back in the DLQ
            assert (await api.post("/api/dlq/tasks/retry-batch", json=["x"] * 101)).status_code == 413
            assert (await api.post("/api/dlq/tasks/retry-batch", json={"ids": []})).status_code == 422
            deleted = await api.delete(f"/api/dlq/tasks/celery-{rejected}")
            assert deleted.json()["status"] == "success"
            assert (await api.delete(f"/api/dlq/tasks/celery-{rejected}")).status_code == 404
            assert (await api.get("/api/dlq/statistics")).json()["queue_size"] == 0


async def test_cancel_each_state_with_the_contracts_answers(
    redis_url: str, namespace: str, executor_url: str
) -> None:
    env = stack_env(redis_url, namespace, executor_url, CELERY_CONCURRENCY="1", CRUCIBLE_WORKER_THREADS="1")
    with ExitStack() as stack:
        async with (
            stack_and_client(stack, "cancel", env) as api,
            executor_client(executor_url) as ex,
        ):
            running = await submit(api, "import time; time.sleep(30)")
            await wait_for(api, running, lambda b: b["status"] == "running")
            pending = await submit(api, "print('never')")

            refused = await api.post(f"/api/eval/{running}/cancel")
            assert refused.status_code == 400
            assert refused.json()["error"] == "Task is already running. Use terminate=true to force stop."
            assert refused.json()["details"]["previous_state"] == "STARTED"

            queued = await api.post(f"/api/eval/{pending}/cancel")
            assert queued.status_code == 200
            assert queued.json()["message"] == "Task cancelled successfully (was pending in queue)"
            assert queued.json()["previous_state"] == "PENDING" and queued.json()["cancelled"] is True
            assert (await api.get("/health")).json()["queues"]["default"] == 0

            started = time.monotonic()
            terminated = await api.post(f"/api/eval/{running}/cancel", params={"terminate": "true"})
            assert terminated.json()["message"] == "Task forcefully terminated (was running)"
            gone_after = None
            for _ in range(500):
                if running not in [r["eval_id"] for r in (await ex.get("/running")).json()["running"]]:
                    gone_after = time.monotonic() - started
                    break
                await asyncio.sleep(0.02)
            assert gone_after is not None and gone_after < 1.0

            again = await api.post(f"/api/eval/{running}/cancel", params={"terminate": "true"})
            assert again.status_code == 400 and again.json()["error"] == "Task was already cancelled"
            done = await submit(api, "print('done')")
            await wait_final(api, done)
            finished = await api.post(f"/api/eval/{done}/cancel")
            assert finished.json()["error"] == "Task already completed with state: SUCCESS"
            assert (await api.post("/api/eval/nope/cancel")).status_code == 404
            assert (
                await api.post(f"/api/eval/{done}/cancel", params={"terminate": "maybe"})
            ).status_code == 422

            await asyncio.sleep(1.5)  # time for any wrongly surviving message to run
            for eval_id in (running, pending):
                record = (await api.get(f"/api/eval/{eval_id}")).json()
                assert record["status"] == "cancelled" and record["celery_state"] == "REVOKED"
                assert record["retries"] == 0
            assert (await api.get(f"/api/eval/{pending}")).json()["started_at"] is None
            assert (await api.get("/api/dlq/statistics")).json()["queue_size"] == 0


async def test_cancel_while_waiting_to_retry_stops_the_chain(redis_url: str, namespace: str) -> None:
    port = free_port()
    policies = json.dumps({"network_error": {"base_delay": 30}})
    env = stack_env(redis_url, namespace, f"http://127.0.0.1:{port}", CRUCIBLE_RETRY_POLICIES=policies)
    with ExitStack() as stack:
        async with stack_and_client(stack, "cancel-retry", env) as api:
            eval_id = await submit(api, "print('never')")
            await wait_for(api, eval_id, lambda b: b["celery_state"] == "RETRY")
            assert (await api.get("/health")).json()["queues"]["delayed"] == 1
            response = await api.post(f"/api/eval/{eval_id}/cancel")
            assert response.status_code == 200
            assert response.json()["message"] == "Task cancelled successfully (retry chain stopped)"
            assert response.json()["previous_state"] == "RETRY"
            assert (await api.get("/health")).json()["queues"]["delayed"] == 0
            record = (await api.get(f"/api/eval/{eval_id}")).json()
            assert record["status"] == "cancelled" and record["next_retry_at"] is None


async def test_cancel_racing_the_end_of_runs_leaves_one_final_status(
    api: httpx.AsyncClient, aredis, shared_stack: Stack
) -> None:
    ids = [await submit(api, f"print({n})") for n in range(20)]

    async def cancel_later(eval_id: str, n: int) -> None:
        await asyncio.sleep(n * 0.01)
        await api.post(f"/api/eval/{eval_id}/cancel", params={"terminate": "true"})

    await asyncio.gather(*(cancel_later(i, n) for n, i in enumerate(ids)))
    finals = [await wait_final(api, i) for i in ids]
    assert {f["status"] for f in finals} <= {"completed", "cancelled"}
    for eval_id in ids:
        events = [
            json.loads(e)
            for e in await aredis.lrange(f"{shared_stack.namespace}:eval:{eval_id}:events", 0, -1)
        ]
        assert sum(e["status"] in TERMINAL for e in events) == 1, events


async def test_more_commands_at_once_than_the_pool_holds_wait_for_a_connection(
    redis_url: str, namespace: str
) -> None:
    """A burst of requests in one process must queue for Redis connections, not fail: the
    plain pool raised "Too many connections" past 100, and the API answered 503."""
    client = async_client(redis_url)
    try:
        burst = POOL_SIZE + 20  # each BLPOP holds its connection until it times out
        empty = [f"{namespace}:empty"]
        replies = await asyncio.gather(*(client.blpop(empty, timeout=0.2) for _ in range(burst)))
        assert replies == [None] * burst
    finally:
        await client.aclose()
