"""Submissions through HTTP, run by real workers in the real sandbox, read back over HTTP."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, ExitStack

import httpx
import redis.asyncio as aioredis

from bench.stack import free_port, process, wait_http
from infra.redis_client import POOL_SIZE
from tests.conftest import Stack, stack_env, start_api
from tests.helpers import api_client, submit, wait_final


async def test_hello_world_completes_with_its_output(api: httpx.AsyncClient) -> None:
    response = await api.post("/api/eval", json={"code": "print('hello, crucible')"})
    assert response.status_code == 200
    accepted = response.json()
    assert accepted["status"] == "queued"
    assert accepted["message"] == "Evaluation queued successfully"
    assert accepted["eval_id"].startswith("eval_")
    assert accepted["task_id"] == f"celery-{accepted['eval_id']}"
    assert isinstance(accepted["queue_position"], int)

    result = await wait_final(api, accepted["eval_id"])
    assert result["status"] == "completed"
    assert result["success"] is True
    assert result["output"] == "hello, crucible\n"
    assert result["exit_code"] == 0
    assert result["runtime_ms"] >= 0
    assert result["created_at"] <= result["started_at"] <= result["completed_at"]
    assert result["worker"] and result["executor"]

    again = await api.get(f"/api/eval-status/{accepted['eval_id']}")
    assert again.json()["status"] == "completed"


async def test_sys_exit_fails_with_exit_code(api: httpx.AsyncClient) -> None:
    result = await wait_final(api, await submit(api, "import sys\nprint('partial')\nsys.exit(1)"))
    assert result["status"] == "failed"
    assert result["success"] is False
    assert result["exit_code"] == 1
    assert result["output"] == "partial\n"


async def test_uncaught_exception_fails_with_traceback(api: httpx.AsyncClient) -> None:
    result = await wait_final(api, await submit(api, "1/0"))
    assert result["status"] == "failed"
    assert "ZeroDivisionError: division by zero" in result["error"]


async def test_infinite_loop_times_out_within_its_limit(api: httpx.AsyncClient) -> None:
    started = time.monotonic()
    result = await wait_final(api, await submit(api, "while True:\n    pass", timeout=2))
    assert result["status"] == "timeout"
    assert result["error"] == "CPU time limit of 2s exceeded"
    assert result["runtime_ms"] < 4000
    assert time.monotonic() - started < 15


async def test_sleeping_past_the_wall_limit_times_out(api: httpx.AsyncClient) -> None:
    """The wall clock gets three times the CPU-time limit (`timeout`)."""
    result = await wait_final(api, await submit(api, "import time\ntime.sleep(60)", timeout=1))
    assert result["status"] == "timeout"
    assert result["error"].startswith("Wall-clock time limit of 3s exceeded")
    assert result["runtime_ms"] < 4000


async def test_fifty_concurrent_submissions_all_complete(api: httpx.AsyncClient) -> None:
    codes = [f"print({i} * {i})" for i in range(50)]
    ids = await asyncio.gather(*(submit(api, code) for code in codes))
    assert len(set(ids)) == 50
    results = await asyncio.gather(*(wait_final(api, eval_id, seconds=120) for eval_id in ids))
    assert [r["status"] for r in results] == ["completed"] * 50
    assert [r["output"] for r in results] == [f"{i * i}\n" for i in range(50)]


async def test_output_over_the_cap_is_cut_and_flagged(api: httpx.AsyncClient) -> None:
    result = await wait_final(api, await submit(api, "print('x' * 1_000_000)"))
    assert result["status"] == "completed"
    assert result["output_truncated"] is True
    assert 0 < len(result["output"]) <= 64 * 1024


async def test_listing_shows_recent_evaluations_by_status(api: httpx.AsyncClient) -> None:
    done = await submit(api, "print('listed')")
    await wait_final(api, done)
    page = (await api.get("/api/evaluations", params={"limit": 5, "status": "completed"})).json()
    assert page["limit"] == 5 and page["offset"] == 0
    assert all(row["status"] == "completed" and row["success"] for row in page["evaluations"])
    assert done in [row["eval_id"] for row in page["evaluations"]]
    row = next(r for r in page["evaluations"] if r["eval_id"] == done)
    assert row["code_preview"] == "print('listed')"
    everything = (await api.get("/api/evaluations", params={"limit": 1})).json()
    assert everything["count"] == 1 and everything["has_more"] is True


async def test_caller_supplied_eval_id_is_kept_and_duplicates_refused(
    api: httpx.AsyncClient, shared_stack: Stack, aredis: aioredis.Redis
) -> None:
    eval_id = f"client-{time.monotonic_ns()}"
    first = await api.post("/api/eval", json={"code": "print(1)", "eval_id": eval_id})
    assert first.status_code == 200 and first.json()["eval_id"] == eval_id
    second = await api.post("/api/eval", json={"code": "print(2)", "eval_id": eval_id})
    assert second.status_code == 409
    assert second.json()["details"]["field"] == "eval_id"
    assert (await wait_final(api, eval_id))["output"] == "1\n"
    # a duplicate of a finished evaluation holds no place in the key's quota, whichever door
    batch = await api.post(
        "/api/eval-batch", json={"evaluations": [{"code": "print(3)", "eval_id": eval_id}]}
    )
    assert batch.json()["failed"] == 1
    assert (await api.post("/api/eval", json={"code": "print(4)", "eval_id": eval_id})).status_code == 409
    assert not await aredis.sismember(f"{shared_stack.namespace}:active:env-admin", eval_id)


async def test_batch_goes_to_the_low_queue(api: httpx.AsyncClient) -> None:
    response = await api.post(
        "/api/eval-batch",
        json={"evaluations": [{"code": "print('a')"}, {"code": ""}, {"code": "print('b')"}]},
    )
    body = response.json()
    assert body["total"] == 3 and body["queued"] == 2 and body["failed"] == 1
    assert body["evaluations"][1]["field"] == "code"
    ids = [e["eval_id"] for e in body["evaluations"] if e["status"] == "queued"]
    results = [await wait_final(api, i) for i in ids]
    assert [r["output"] for r in results] == ["a\n", "b\n"]
    assert {r["queue"] for r in results} == {"low"}


async def test_health_reports_redis_and_queues(api: httpx.AsyncClient) -> None:
    for path in ("/health", "/api/health"):
        body = (await api.get(path)).json()
        # The shared stack runs no scheduler: the API works, but health says what is missing.
        assert body["status"] == "degraded" and body["redis"] == "ok"
        assert (
            body["workers_online"] == 2 and body["executors_online"] == 1 and body["schedulers_online"] == 0
        )
        assert set(body["queues"]) >= {"high", "default", "low", "delayed", "in_flight"}


async def test_status_changes_can_be_followed_as_server_sent_events(api: httpx.AsyncClient) -> None:
    eval_id = await submit(api, "import time; time.sleep(0.3); print('followed')")
    statuses, kind = [], None
    async with api.stream("GET", f"/api/eval/{eval_id}/events") as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        async for line in response.aiter_lines():
            if line.startswith("event: "):
                kind = line[len("event: ") :]
            if line.startswith("data: ") and kind == "status":  # besides `output` events
                statuses.append(json.loads(line[len("data: ") :])["status"])
    assert statuses == ["queued", "running", "completed"]
    # following a finished evaluation replays its timeline and closes
    async with api.stream("GET", f"/api/eval/{eval_id}/events") as response:
        replay = [json.loads(x[6:])["status"] async for x in response.aiter_lines() if x.startswith("data: ")]
    assert replay == statuses
    assert (await api.get("/api/eval/nope/events")).status_code == 404


async def test_many_open_event_streams_leave_the_api_serving(
    redis_url: str, namespace: str, executor_url: str
) -> None:
    """Each stream held a Redis connection of its own: a hundred followers took the API
    process's whole pool, and every other request waited for one, then failed."""
    with ExitStack() as processes:
        running = start_api(processes, "streams", stack_env(redis_url, namespace, executor_url))  # no workers
        async with api_client(running.api_url, limits=httpx.Limits(max_connections=None)) as client:
            eval_id = await submit(client, "print('followed')")  # stays queued: nothing runs it
            async with AsyncExitStack() as streams:
                followers = []
                for _ in range(POOL_SIZE + 20):
                    response = await streams.enter_async_context(
                        client.stream("GET", f"/api/eval/{eval_id}/events")
                    )
                    assert response.status_code == 200
                    lines = response.aiter_lines()
                    assert await _next_status(lines) == "queued"
                    followers.append(lines)
                other = await asyncio.wait_for(client.post("/api/eval", json={"code": "print(2)"}), 5)
                assert other.status_code == 200, other.text
                assert (await client.post(f"/api/eval/{eval_id}/cancel")).status_code == 200
                ends = await asyncio.wait_for(asyncio.gather(*(_next_status(f) for f in followers)), 10)
                assert ends == ["cancelled"] * len(followers)


async def test_a_stopping_api_closes_event_streams_that_would_never_end(
    redis_url: str, namespace: str, executor_url: str
) -> None:
    """A stream ends only with its evaluation: one left open kept a stopped API running."""
    port = free_port()
    env = {**stack_env(redis_url, namespace, executor_url), "CRUCIBLE_API_PORT": str(port)}
    with process("stopping-api", "api", env) as api_process:
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/health")
        async with api_client(url) as client:
            eval_id = await submit(client, "print('never run')")  # no workers: stays queued
            async with client.stream("GET", f"/api/eval/{eval_id}/events") as response:
                lines = response.aiter_lines()  # kept: the stream stays open while it waits
                assert await _next_status(lines) == "queued"
                api_process.send_signal(signal.SIGTERM)
                await asyncio.to_thread(api_process.wait, 30)  # raises if it is still running


async def _next_status(lines: AsyncIterator[str]) -> str:
    async for line in lines:
        if line.startswith("data: "):
            return json.loads(line[len("data: ") :])["status"]
    raise AssertionError("the stream ended without a status")


async def test_a_message_sent_straight_to_the_actor_is_recorded_and_run(
    api: httpx.AsyncClient, shared_stack, redis_url: str
) -> None:
    """Celery-era callers send to the actor without the API: the worker records it itself."""
    from actors.broker import PriorityBroker
    from evaluations.queue import evaluation_message
    from evaluations.submission_spec import RunSpec

    broker = PriorityBroker(url=redis_url, namespace=shared_stack.namespace)
    eval_id = f"direct-{time.monotonic_ns()}"
    broker.enqueue(evaluation_message(eval_id, RunSpec("print('sent directly')", "python", 10)))
    broker.client.close()
    for _ in range(100):
        if (await api.get(f"/api/eval/{eval_id}")).status_code == 200:
            break
        await asyncio.sleep(0.05)
    result = await wait_final(api, eval_id)
    assert result["status"] == "completed" and result["output"] == "sent directly\n"
