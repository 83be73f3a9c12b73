"""Operators' view: health, Celery-shaped status with live workers, queue details, metrics."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import json
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from typing import Any

import httpx

from bench.stack import ROOT, free_port, process, wait_http
from tests.conftest import stack_env, start_api
from tests.helpers import api_client, submit, wait_final


async def poll(api: httpx.AsyncClient, path: str, ready: Any, seconds: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + seconds
    while not ready(body := (await api.get(path)).json()):
        assert time.monotonic() < deadline, body
        await asyncio.sleep(0.2)
    return body


def metric(text: str, name: str, labels: str = "") -> float:
    found = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.M)
    assert found, f"{name}{labels} not in /metrics"
    return float(found.group(1))


async def test_status_shows_workers_tasks_queues_and_a_worker_that_died(
    redis_url: str, executor_url: str, namespace: str
) -> None:
    env = stack_env(
        redis_url, namespace, executor_url, CELERY_CONCURRENCY="1", CRUCIBLE_WORKER_THREADS="2",
        CRUCIBLE_HEARTBEAT_TIMEOUT_MS="3000",
    )  # fmt: skip
    with ExitStack() as stack:
        s = start_api(stack, "ops", env)
        worker = stack.enter_context(process("ops-worker", "worker", s.env))
        stack.enter_context(process("ops-scheduler", "scheduler", s.env))
        async with api_client(s.api_url) as api:
            health = await poll(api, "/health", lambda b: b.get("status") == "healthy")
            assert health["workers_online"] == 1 and health["executors_online"] == 1
            assert health["schedulers_online"] == 1

            done = [await submit(api, f"print({n})") for n in range(3)]
            for eval_id in done:
                await wait_final(api, eval_id)
            slow = [await submit(api, "import time; time.sleep(3)") for _ in range(2)]
            waiting = await submit(api, "print('third')")  # both threads busy: it waits

            def busy(body: dict[str, Any]) -> bool:
                stats = list(body["worker_stats"].values())
                held = [t for tasks in body["active_tasks_by_worker"].values() for t in tasks]
                return (
                    len(held) == 2 and bool(stats) and stats[0]["active"] == 2 and stats[0]["processed"] >= 3
                )

            status = await poll(api, "/api/celery-status", busy)
            assert status["enabled"] and status["connected"]
            (name,) = status["worker_names"]
            assert (status["workers"], status["active_tasks"]) == (1, 2)  # the original's counts
            stats = status["worker_stats"][name]
            assert stats["pid"] > 0 and stats["concurrency"] == 2 and stats["online"] is True
            assert stats["queues"] == ["high", "default", "low"]
            assert stats["processed"] >= 3 and stats["active"] == 2
            assert sorted(status["active_tasks_by_worker"][name]) == sorted(f"celery-{i}" for i in slow)
            assert status["queue_details"]["default"]["ready"] == 1
            assert status["queue_details"]["default"]["in_flight"] == 2
            assert status["queue_details"]["default"]["oldest_age_s"] >= 0
            assert "tasks.evaluate_code" not in status["registered_tasks"]
            assert {"evaluate_code", "health_check", "cleanup_old_evaluations"} <= set(
                status["registered_tasks"]
            )
            queue_status = (await api.get("/api/queue-status")).json()
            assert queue_status["processing"] == 2 and queue_status["queued"] == 1
            await wait_final(api, waiting)

            metrics = (await api.get("/metrics")).text
            assert metric(metrics, "crucible_run_duration_seconds_count") >= 5
            assert metric(metrics, "crucible_queue_wait_seconds_count") >= 6
            assert metric(metrics, "crucible_workers_online") == 1
            assert (
                metric(
                    metrics,
                    "crucible_evaluations_finished_total",
                    '{queue_system="dramatiq",status="completed"}',
                )
                >= 5
            )
            assert (
                metric(
                    metrics,
                    "crucible_evaluations_by_language_total",
                    '{language="python",status="completed"}',
                )
                >= 5
            )
            # Histograms: every bucket on every scrape, cumulative, ending in +Inf == count.
            for histogram in ("crucible_run_duration_seconds", "crucible_queue_wait_seconds"):
                buckets = re.findall(rf'^{histogram}_bucket{{le="([^"]+)"}} (\S+)$', metrics, re.M)
                assert [le for le, _ in buckets][-1] == "+Inf" and len(buckets) == 13
                counts = [float(n) for _, n in buckets]
                assert counts == sorted(counts) and counts[-1] == metric(metrics, f"{histogram}_count")
                assert dict(buckets)["10.0"] == buckets[-1][1] != "0.0"  # hello worlds: all under 10 s
            assert metric(metrics, "crucible_retries_total", '{policy="default"}') == 0
            # Every series the Grafana dashboard in deploy/ queries is one /metrics serves.
            grafana = json.loads((ROOT / "deploy" / "grafana" / "crucible-dashboard.json").read_text())
            exprs = [t["expr"] for p in grafana["panels"] for t in p["targets"]]
            queried = {n for e in exprs for n in re.findall(r"crucible_\w+", e)}
            served = set(re.findall(r"^(crucible_\w+)", metrics, re.M))
            assert queried and queried <= served, queried - served

            # A submission with test cases counts its verdict and its cases as it finishes.
            assert metric(metrics, "crucible_verdicts_total", '{verdict="wrong_answer"}') == 0
            tests = [{"stdin": "1", "expected_output": "1"}, {"stdin": "2", "expected_output": "3"}]
            judged = await wait_final(api, await submit(api, "print(input())", tests=tests))
            assert (judged["verdict"], judged["passed"]) == ("wrong_answer", 1)
            after = (await api.get("/metrics")).text
            assert metric(after, "crucible_verdicts_total", '{verdict="wrong_answer"}') == 1
            assert metric(after, "crucible_verdicts_total", '{verdict="accepted"}') == 0
            assert metric(after, "crucible_cases_total", '{status="accepted"}') == 1
            assert metric(after, "crucible_cases_total", '{status="wrong_answer"}') == 1

            # A worker killed outright stops publishing: shown as gone, health degraded.
            os.killpg(worker.pid, signal.SIGKILL)
            gone = await poll(api, "/api/celery-status", lambda b: b["workers"] == 0, seconds=60)
            assert gone["worker_stats"][name]["online"] is False, gone["worker_stats"]
            assert (await api.get("/health")).json()["status"] == "degraded"


async def test_the_api_runs_as_several_processes_on_one_port(
    redis_url: str, executor_url: str, namespace: str
) -> None:
    """CRUCIBLE_API_PROCESSES: more cores for the API, one address for its callers."""
    port = free_port()
    env = stack_env(
        redis_url, namespace, executor_url, CRUCIBLE_API_PROCESSES="2", CRUCIBLE_API_PORT=str(port)
    )
    url = f"http://127.0.0.1:{port}"
    with ExitStack() as stack:
        api_process = stack.enter_context(process("multi-api", "api", env))
        stack.enter_context(process("multi-worker", "worker", env))
        wait_http(f"{url}/health")
        children = open(f"/proc/{api_process.pid}/task/{api_process.pid}/children").read().split()
        commands = [open(f"/proc/{child}/cmdline", "rb").read() for child in children]
        assert len([c for c in commands if b"resource_tracker" not in c]) == 2  # not multiprocessing's

        async def submit_alone(n: int) -> str:
            async with api_client(url) as api:  # a connection of its own
                return await submit(api, f"print({n})")

        eval_ids = await asyncio.gather(*(submit_alone(n) for n in range(12)))
        async with api_client(url) as api:
            results = [await wait_final(api, eval_id) for eval_id in eval_ids]
        assert [r["output"] for r in results] == [f"{n}\n" for n in range(12)]


def test_a_setting_the_service_cannot_use_is_named_without_a_traceback() -> None:
    for name, value, expected in [
        ("CRUCIBLE_API_PROCESSES", "0", "CRUCIBLE_API_PROCESSES must be 1 or more, got 0"),
        ("CRUCIBLE_API_PORT", "eighty", "CRUCIBLE_API_PORT must be a whole number, got 'eighty'"),
    ]:
        ran = subprocess.run(
            [sys.executable, "-m", "app.cli", "api"],
            # a free port: were the setting taken, this would serve rather than hold 8080
            env={**os.environ, "CRUCIBLE_API_PORT": str(free_port()), name: value},
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=20,
        )
        assert ran.returncode == 2
        assert ran.stderr.strip() == f"crucible api: {expected}"


async def test_the_api_sets_the_collector_for_serving_once_started(redis_url: str, namespace: str) -> None:
    """Full collections skip what start-up made, and young ones run less often (infra/gc_tuning.py):
    measured, this took the slowest `POST /api/eval` from ~45 ms to ~15 ms under load."""
    from app.api.routes import create_app
    from infra.gc_tuning import YOUNG_THRESHOLD
    from infra.settings import Settings

    app = create_app(dataclasses.replace(Settings.from_env(), redis_url=redis_url, namespace=namespace))
    before = gc.get_threshold()
    gc.unfreeze()
    try:
        async with app.router.lifespan_context(app):  # the API's start-up, as uvicorn runs it
            assert gc.get_freeze_count() > 10_000  # the modules, the app, its clients
            assert gc.get_threshold()[0] == YOUNG_THRESHOLD
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def test_a_worker_process_sets_the_collector_for_serving_once_booted(redis_url: str, namespace: str) -> None:
    """The production broker's middleware does for each worker process what the API does."""
    import dramatiq.broker
    from dramatiq import Worker

    from actors.runtime import WorkerRuntime
    from actors.worker import build_broker
    from infra.gc_tuning import YOUNG_THRESHOLD
    from infra.settings import Settings

    global_broker = dramatiq.broker.global_broker  # build_broker replaces it: put it back after
    settings = dataclasses.replace(Settings.from_env(), redis_url=redis_url, namespace=namespace)
    broker = build_broker(settings, WorkerRuntime(settings))
    before = gc.get_threshold()
    gc.unfreeze()
    worker = Worker(broker, worker_threads=1, worker_timeout=100)
    try:
        worker.start()
        assert gc.get_freeze_count() > 10_000
        assert gc.get_threshold()[0] == YOUNG_THRESHOLD
    finally:
        worker.stop()
        broker.close()
        dramatiq.broker.global_broker = global_broker
        gc.unfreeze()
        gc.set_threshold(*before)
