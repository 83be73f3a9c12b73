"""The Celery wire (app/celery/ingress.py), driven by the real `celery` client package as the
platform's unchanged producers drive it: `send_task` by name onto the legacy queues, results
through Celery's Redis result backend. Each test has a Redis database of its own: the Celery
queue lists are not namespaced."""

from __future__ import annotations

import json
import os
import random
import signal
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import httpx
import pytest
import redis
from celery import Celery

from bench.stack import delete_namespace, process
from evaluations.celery_wire import LEGACY_QUEUES, queue_lists
from evaluations.redis_keys import RedisKeys
from evaluations.submission_spec import MIN_TIMEOUT_S
from evaluations.validation import MIN_MEMORY_MB
from infra.settings import Settings
from tests.conftest import Stack, stack_env, start_api, start_stack
from tests.helpers import EXECUTOR_SECRET, TEST_ADMIN_KEY

#: Marks a Redis database one of these tests holds (several suites may share a Redis).
CLAIM_KEY = "crucible-test-celery-wire-claim"
#: What a Celery client and Crucible's result records leave in a database (besides the queues).
LEFT_BY_CELERY = (
    "celery-task-meta-*", "{celery-task-meta-*", "_kombu.*", "*.reply.celery.pidbox", "unacked*",
)  # fmt: skip


@contextmanager
def database(redis_url: str) -> Iterator[str]:
    """A Redis database of the server at `redis_url` that was empty, held by this test (a claim
    key) and emptied of what the test and its Celery client made there afterwards: the Celery
    queue lists are not namespaced, so each test needs a database of its own."""
    base = redis_url.rsplit("/", 1)[0]
    for index in random.sample(range(1, 16), 15):
        client = redis.Redis.from_url(f"{base}/{index}")
        if client.dbsize() == 0 and client.set(CLAIM_KEY, "1", nx=True, ex=900):
            try:
                yield f"{base}/{index}"
            finally:
                for pattern in LEFT_BY_CELERY:
                    for key in client.scan_iter(pattern):
                        client.delete(key)
                for queue in LEGACY_QUEUES:
                    client.delete(*queue_lists(queue))
                client.delete(CLAIM_KEY)
                client.close()
            return
        client.close()
    raise RuntimeError("no empty Redis database to hold for this test")


@pytest.fixture(scope="module")
def wire(redis_url: str, executor_url: str) -> Iterator[Stack]:
    ns = f"crucible-test-{uuid.uuid4().hex[:8]}"
    with ExitStack() as stack:
        url = stack.enter_context(database(redis_url))
        running = start_stack(stack, "wire", stack_env(url, ns, executor_url))
        stack.enter_context(process("wire-ingress", "celery-ingress", running.env))
        ingress_running(running.api_url)
        yield running
        stack.callback(delete_namespace, url, ns)


@pytest.fixture
def own_database(redis_url: str) -> Iterator[str]:
    with database(redis_url) as url:
        yield url


def ingress_running(api_url: str) -> None:
    """Until /health says an ingress runs (it listens for revokes from then on)."""
    for _ in range(200):
        if httpx.get(f"{api_url}/health").json()["celery_wire"]["ingress"] == "running":
            return
        time.sleep(0.05)
    raise AssertionError("the Celery ingress did not start")


def producer(url: str) -> Celery:
    """The platform API's Celery app: a producer pointed at Crucible's Redis."""
    return Celery("crucible_api", broker=url, backend=url)


def test_send_task_by_each_name_runs_and_answers_async_result(wire: Stack) -> None:
    app = producer(wire.env["REDIS_URL"])
    client = redis.Redis.from_url(wire.env["REDIS_URL"])
    forms = [
        ("tasks.evaluate_code", "evaluation", ["print('hi')", "python"]),
        ("celery_worker.tasks.evaluate_code", "high_priority", ["print('hi')", "python"]),
        ("celery_worker.tasks.evaluate_code", "batch", ["print('hi')", "python", 5, "256Mi", 1]),
    ]
    for name, queue, rest in forms:
        eval_id = f"wire-{uuid.uuid4().hex[:8]}"
        result = app.send_task(name, args=[eval_id, *rest], queue=queue, task_id=f"celery-{eval_id}")
        value = result.get(timeout=60)
        assert value["eval_id"] == eval_id and value["status"] == "completed" and value["output"] == "hi\n"
        assert result.state == "SUCCESS"
        record = client.hgetall(f"{wire.namespace}:eval:{eval_id}")
        expected = {"evaluation": b"default", "high_priority": b"high", "batch": b"low"}[queue]
        assert record[b"queue"] == expected and json.loads(record[b"metadata"])["source"] == "celery-wire"
    client.close()


def test_a_failing_evaluation_is_a_celery_failure_and_a_revoked_one_revoked(wire: Stack) -> None:
    app = producer(wire.env["REDIS_URL"])
    eval_id = f"wire-{uuid.uuid4().hex[:8]}"
    result = app.send_task("tasks.evaluate_code", args=[eval_id, "1/0", "python"], queue="evaluation",
                           task_id=f"celery-{eval_id}")  # fmt: skip
    with pytest.raises(Exception, match="ZeroDivisionError"):
        result.get(timeout=60)
    assert result.state == "FAILURE" and "ZeroDivisionError" in result.traceback


def test_a_message_crucible_cannot_run_is_dead_lettered_with_its_reason(wire: Stack) -> None:
    app = producer(wire.env["REDIS_URL"])
    client = redis.Redis.from_url(wire.env["REDIS_URL"])
    keys = RedisKeys(wire.namespace)
    bad = {
        "celery-unknown-task": ("tasks.something_else", ["e", "print(1)", "python"]),
        "celery-bad-language": ("tasks.evaluate_code", ["wire-bad", "print(1)", "cobol"]),
    }
    for task_id, (name, args) in bad.items():
        app.send_task(name, args=args, queue="evaluation", task_id=task_id)
    entries: dict[str, dict] = {}
    for _ in range(100):
        entries = {t: json.loads(e) for t in bad if (e := client.hget(keys.dlq_entries, t))}
        if len(entries) == len(bad) and int(client.hget(keys.celery_wire_counts, "rejected") or 0) >= 2:
            break
        time.sleep(0.1)
    assert "unknown task 'tasks.something_else'" in entries["celery-unknown-task"]["exception_message"]
    assert "unknown language 'cobol'" in entries["celery-bad-language"]["exception_message"]
    assert int(client.hget(keys.celery_wire_counts, "rejected") or 0) >= 2
    assert client.llen("evaluation") == 0  # taken, not left behind
    client.close()
    health = httpx.get(f"{wire.api_url}/health").json()  # operators see it
    assert health["status"] == "degraded" and health["celery_wire"]["rejected"] >= 2
    assert "dead-lettered" in health["celery_wire"]["problem"]


def test_a_killed_ingress_loses_and_duplicates_nothing(own_database: str, executor_url: str) -> None:
    url = own_database
    ns = f"crucible-test-{uuid.uuid4().hex[:8]}"
    app = producer(url)
    client = redis.Redis.from_url(url)
    keys = RedisKeys(ns)
    count = 60
    ids = [f"kill-{n}-{uuid.uuid4().hex[:6]}" for n in range(count)]
    results = [app.send_task("tasks.evaluate_code", args=[e, f"print({n})", "python"], queue="evaluation",
                             task_id=f"celery-{e}") for n, e in enumerate(ids)]  # fmt: skip
    try:
        with ExitStack() as stack:
            running = start_stack(stack, "wire-kill", stack_env(url, ns, executor_url))
            with process("wire-kill-ingress", "celery-ingress", running.env) as ingress:
                for _ in range(200):  # some taken, most not yet
                    if int(client.hget(keys.celery_wire_counts, "accepted") or 0) >= 5:
                        break
                    time.sleep(0.01)
                os.killpg(ingress.pid, signal.SIGKILL)
                ingress.wait()
            taken_when_killed = count - client.llen("evaluation")
            assert 0 < taken_when_killed < count
            with process("wire-kill-ingress-again", "celery-ingress", running.env):
                outputs = [r.get(timeout=120)["output"] for r in results]
        assert outputs == [f"{n}\n" for n in range(count)]  # every one ran, with its own result
        records = [k for k in client.scan_iter(f"{ns}:eval:*") if k.count(b":") == 2]
        assert len(records) == count  # each recorded once
        counts = {k.decode(): int(v) for k, v in client.hgetall(keys.celery_wire_counts).items()}
        # one killed between recording and dropping it from our list is found recorded again:
        # counted as a duplicate taken, not as a second evaluation
        assert counts.get("accepted", 0) + counts.get("duplicate", 0) == count, counts
        assert counts.get("rejected", 0) == 0, counts
        assert all(client.hget(f"{ns}:eval:{e}", "retries") == b"0" for e in ids)  # none ran twice
    finally:
        client.close()
        delete_namespace(url, ns)


def test_revoke_cancels_a_running_task_with_terminate(wire: Stack) -> None:
    app = producer(wire.env["REDIS_URL"])
    eval_id = f"wire-{uuid.uuid4().hex[:8]}"
    result = app.send_task("tasks.evaluate_code", args=[eval_id, "import time; time.sleep(30)", "python"],
                           queue="evaluation", task_id=f"celery-{eval_id}")  # fmt: skip
    for _ in range(200):
        if result.state == "STARTED":
            break
        time.sleep(0.05)
    assert result.state == "STARTED"
    began = time.monotonic()
    app.control.revoke(result.id, terminate=True)
    for _ in range(200):
        if result.state == "REVOKED":
            break
        time.sleep(0.05)
    assert result.state == "REVOKED" and time.monotonic() - began < 10


def test_revoke_of_a_queued_task_means_it_never_runs(own_database: str, executor_url: str) -> None:
    url = own_database
    ns = f"crucible-test-{uuid.uuid4().hex[:8]}"
    app = producer(url)
    client = redis.Redis.from_url(url)
    try:
        with ExitStack() as stack:  # an ingress and no worker: what it records stays queued
            env = stack_env(url, ns, executor_url)
            stack.enter_context(process("wire-queued-ingress", "celery-ingress", env))
            eval_id = f"wire-{uuid.uuid4().hex[:8]}"
            result = app.send_task("tasks.evaluate_code", args=[eval_id, "print(1)", "python"],
                                   queue="evaluation", task_id=f"celery-{eval_id}")  # fmt: skip
            for _ in range(200):
                if client.hget(f"{ns}:eval:{eval_id}", "status") == b"queued":
                    break
                time.sleep(0.05)
            app.control.revoke(result.id)
            for _ in range(200):
                if result.state == "REVOKED":
                    break
                time.sleep(0.05)
            assert result.state == "REVOKED"
            assert client.hget(f"{ns}:eval:{eval_id}", "status") == b"cancelled"
    finally:
        client.close()
        delete_namespace(url, ns)


def test_a_legacy_queue_nobody_consumes_degrades_health(own_database: str, executor_url: str) -> None:
    url = own_database
    ns = f"crucible-test-{uuid.uuid4().hex[:8]}"
    try:
        with ExitStack() as stack:  # the API and no ingress
            api = start_api(stack, "wire-unconsumed", stack_env(url, ns, executor_url), healthy=False)
            producer(url).send_task(
                "tasks.evaluate_code", args=["e1", "print(1)", "python"], queue="high_priority"
            )
            wire_health = httpx.get(f"{api.api_url}/health").json()
            assert wire_health["status"] == "degraded"
            assert wire_health["celery_wire"]["waiting"] == {"high_priority": 1}
            assert wire_health["celery_wire"]["ingress"] == "absent"
    finally:
        delete_namespace(url, ns)


def test_celery_inspect_ping_sees_crucibles_workers_answer(wire: Stack) -> None:
    app = producer(wire.env["REDIS_URL"])
    replies = app.control.inspect(timeout=2).ping()
    assert replies, "no worker answered"
    assert all(answer == {"ok": "pong"} for answer in replies.values())
    assert len(replies) == 2  # the stack's two worker processes


def test_revoke_finds_a_task_sent_with_celerys_own_task_id(wire: Stack) -> None:
    """Producers that let Celery choose the task id (a uuid): a revoke names that id."""
    app = producer(wire.env["REDIS_URL"])
    eval_id = f"wire-{uuid.uuid4().hex[:8]}"
    result = app.send_task("tasks.evaluate_code", args=[eval_id, "import time; time.sleep(30)", "python"],
                           queue="evaluation")  # fmt: skip
    for _ in range(200):
        if result.state == "STARTED":
            break
        time.sleep(0.05)
    app.control.revoke(result.id, terminate=True)
    for _ in range(200):
        if result.state == "REVOKED":
            break
        time.sleep(0.05)
    assert result.state == "REVOKED"


async def test_a_message_left_in_the_ingress_list_while_it_runs_is_recorded_within_a_restore(
    own_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that lost `LMOVE`'s answer and retried leaves the first message in the
    ingress's own list while the ingress runs on: the periodic restore records it (every
    `RESTORE_EVERY_S`, shortened here), not only the next start. The ingress runs in this
    process; it takes only the `evaluation` queue, and the message is moved from `batch`."""
    import asyncio

    from app.celery import ingress as celery_ingress
    from app.services import Services
    from infra.settings import Settings

    ns = f"crucible-test-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("REDIS_URL", own_database)
    monkeypatch.setenv("CRUCIBLE_NAMESPACE", ns)
    monkeypatch.setattr(celery_ingress, "RESTORE_EVERY_S", 0.3)
    eval_id = f"lost-move-{uuid.uuid4().hex[:6]}"
    args = [eval_id, "print(1)", "python"]
    producer(own_database).send_task("tasks.evaluate_code", args=args, queue="batch")
    client = redis.Redis.from_url(own_database)
    taken = RedisKeys(ns).celery_wire_taken("evaluation")
    services = Services.build(Settings.from_env())
    stop = asyncio.Event()
    ingress = asyncio.create_task(celery_ingress.CeleryIngress(services, ("evaluation",)).run(stop))
    try:
        await asyncio.sleep(0.5)  # started: its restore at start has run
        assert client.lmove("batch", taken, "RIGHT", "LEFT") is not None  # the "lost" move
        for _ in range(100):
            if client.llen(taken) == 0:
                break
            await asyncio.sleep(0.05)
        assert client.llen(taken) == 0
        assert client.hget(f"{ns}:eval:{eval_id}", "status") == b"queued"
    finally:
        stop.set()
        await ingress
        await services.close()
        client.close()
        delete_namespace(own_database, ns)


def test_a_submissions_bounds_are_the_same_at_the_api_the_wire_and_the_executor(
    wire: Stack, executor_url: str
) -> None:
    """One spec (evaluations/submission_spec.py) at every door: what one refuses, each refuses,
    naming the same field (they used to disagree on timeout's lower bound and whole memory_mb)."""
    settings = Settings.from_env()
    bad: list[tuple[str, dict[str, Any]]] = [
        ("timeout", {"timeout": MIN_TIMEOUT_S / 2}),
        ("timeout", {"timeout": settings.max_timeout + 1}),
        ("memory_mb", {"memory_mb": MIN_MEMORY_MB + 0.5}),
        ("memory_mb", {"memory_mb": settings.memory_limit_mb + 1}),
        ("output_limit", {"output_limit": 0}),
        ("code", {"code": "  "}),
        ("language", {"language": "cobol"}),
    ]
    app = producer(wire.env["REDIS_URL"])
    client = redis.Redis.from_url(wire.env["REDIS_URL"])
    keys = RedisKeys(wire.namespace)
    api = httpx.Client(base_url=wire.api_url, headers={"x-api-key": TEST_ADMIN_KEY}, timeout=30)
    executor = httpx.Client(base_url=executor_url, headers={"authorization": f"Bearer {EXECUTOR_SECRET}"})
    task_ids = []
    for field, given in bad:
        body = {"code": "print(1)", "language": "python", **given}
        answer = api.post("/api/eval", json=body)
        assert answer.status_code == 422 and answer.json()["details"]["field"] == field, (given, answer.text)
        answer = executor.post("/execute", json={"eval_id": f"spec-{uuid.uuid4().hex[:6]}", **body})
        assert answer.status_code == 422 and answer.json()["details"]["field"] == field, (given, answer.text)
        task_id = f"celery-spec-{uuid.uuid4().hex[:8]}"
        app.send_task("tasks.evaluate_code", kwargs={"eval_id": task_id[7:], **body}, queue="evaluation",
                      task_id=task_id)  # fmt: skip
        task_ids.append((task_id, field))
    entries: dict[str, dict[str, Any]] = {}
    for _ in range(100):
        entries = {t: json.loads(e) for t, _ in task_ids if (e := client.hget(keys.dlq_entries, t))}
        if len(entries) == len(task_ids):
            break
        time.sleep(0.1)
    for task_id, field in task_ids:
        assert field in entries[task_id]["exception_message"], entries.get(task_id)
    # and a fractional timeout at the lower bound's side is taken by all three
    body = {"code": "print(1)", "timeout": MIN_TIMEOUT_S + 0.5}
    assert api.post("/api/eval", json=body).status_code == 200
    run = executor.post("/execute", json={"eval_id": f"spec-{uuid.uuid4().hex[:6]}", **body})
    assert run.status_code == 200 and run.json()["output"] == "1\n"
    api.close(), executor.close(), client.close()


def test_a_producers_task_with_test_cases_gets_the_cases_in_its_result(wire: Stack) -> None:
    app = producer(wire.env["REDIS_URL"])
    eval_id = f"wire-{uuid.uuid4().hex[:8]}"
    tests = [{"name": "two", "stdin": "1", "expected_output": "2"},
             {"name": "five", "stdin": "2", "expected_output": "5"}]  # fmt: skip
    given = {"eval_id": eval_id, "code": "print(int(input()) * 2)", "language": "python", "tests": tests}
    task_id = f"celery-{eval_id}"
    result = app.send_task("tasks.evaluate_code", kwargs=given, queue="evaluation", task_id=task_id)
    value = result.get(timeout=60)
    assert value["status"] == "completed" and value["verdict"] == "wrong_answer"
    assert (value["passed"], value["total"]) == (1, 2)
    assert [c["status"] for c in value["cases"]] == ["accepted", "wrong_answer"]
