"""The Celery compatibility layer, used the way the old worker's README shows, from other processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx

import middleware.retry_policy as policy
from tests.conftest import Stack, stack_env, start_stack

CLIENT = Path(__file__).parent.parent / "shim_client.py"


def run_client(stack: Stack, scenario: str, prefix: str) -> dict[str, Any]:
    """Run tests/shim_client.py as a separate caller process configured by the environment."""
    env = {**os.environ, **stack.env}
    env.pop("CRUCIBLE_API_PORT", None)
    done = subprocess.run(
        [sys.executable, str(CLIENT), scenario, prefix], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_retry_config_exports_the_middlewares_own_objects() -> None:
    import retry_config
    import tasks
    from app.celery.shim import DeadLetterQueue

    assert retry_config.RETRY_POLICIES == policy.RETRY_POLICIES  # no overrides in this process
    assert issubclass(retry_config.RetryStrategy, policy.RetryStrategy)
    assert retry_config.should_retry_http_error is policy.should_retry_http_error
    assert retry_config.get_retry_message is policy.get_retry_message
    assert retry_config.DeadLetterQueue is tasks.DeadLetterQueue is DeadLetterQueue
    assert retry_config.calculate_retry_delay(2, "default", add_jitter=False) == 20


async def test_seed_readme_calls_work_unchanged(shared_stack: Stack, api: httpx.AsyncClient) -> None:
    prefix = f"shim-{uuid.uuid4().hex[:6]}"
    seen = run_client(shared_stack, "lifecycle", prefix)

    assert seen["ok"] == {"id": f"celery-{prefix}-ok", "state": "SUCCESS", "status": "SUCCESS",
                          "ready": True, "successful": True, "failed": False}  # fmt: skip
    assert seen["ok_result"]["status"] == "completed" and seen["ok_result"]["output"] == "Hello\n"
    assert seen["high_low_results"] == ["2\n", "3\n"]
    assert (await api.get(f"/api/eval/{prefix}-high")).json()["queue"] == "high"  # queue="high_priority"
    assert (await api.get(f"/api/eval/{prefix}-low")).json()["queue"] == "low"  # priority=1

    assert seen["bad_get_raises"] == "app.celery.shim.EvaluationFailed"
    assert seen["bad_get_no_propagate"] == "EvaluationFailed"
    assert seen["bad"]["state"] == "FAILURE" and seen["bad"]["failed"] and seen["bad"]["ready"]
    assert "ValueError: boom" in seen["bad_traceback"]
    info = seen["bad_info"]
    assert info["state"] == "FAILURE" and info["ready"] and info["failed"] and not info["successful"]
    assert "boom" in info["error"] and "Traceback" in info["traceback"]

    assert seen["slow_started"]["state"] == "STARTED" and not seen["slow_started"]["ready"]
    assert seen["slow_timeout_raises"] == "app.celery.shim.TimeoutError"
    refused = seen["slow_cancel_refused"]
    assert refused["cancelled"] is False and refused["previous_state"] == "STARTED"
    assert refused["message"] == "Task is already running. Use terminate=true to force stop."
    assert seen["slow_revoked"]["state"] == "REVOKED" and seen["slow_revoked"]["ready"]
    assert seen["slow_get_raises"] == "app.celery.shim.TaskRevokedError"
    assert seen["slow_cancel_again"]["message"] == "Task was already cancelled"
    assert seen["ok_cancel"]["message"] == "Task already completed with state: SUCCESS"
    assert seen["ok_cancel"]["cancelled"] is False
    missing = seen["missing_cancel"]
    assert (
        missing["cancelled"] is False and missing["message"] == "Failed to cancel task" and missing["error"]
    )
    assert seen["missing_info"] == {"eval_id": f"{prefix}-missing", "task_id": f"celery-{prefix}-missing",
                                    "state": "PENDING", "ready": False}  # fmt: skip
    ok_info = seen["ok_info"]
    assert ok_info["successful"] is True and ok_info["result"]["output"] == "Hello\n"
    assert seen["health"] == {"status": "healthy", "worker": socket.gethostname()}

    # What the API refuses, the shim refuses when it is called, naming the field; nothing is kept.
    refused = seen["refused"]
    assert refused["empty"] == "field 'code' must not be empty"
    assert refused["surrogate"] == "field 'code' is not valid UTF-8"
    assert refused["language"].startswith("unknown language 'cobol'")
    assert refused["timeout"].startswith("field 'timeout' must be between 1 and")
    for name in refused:
        assert (await api.get(f"/api/eval/{prefix}-{name}")).status_code == 404

    # Another process rebuilds the handle from the task id alone.
    again = run_client(shared_stack, "rebuild", prefix)
    assert again["surface"]["state"] == "SUCCESS" and again["result"]["output"] == "Hello\n"


def test_a_high_priority_only_worker_leaves_other_queues_alone(
    redis_url: str, executor_url: str, namespace: str
) -> None:
    env = stack_env(redis_url, namespace, executor_url, CELERY_QUEUES="high_priority")
    with ExitStack() as stack:
        s = start_stack(stack, "shim-high-only", env)
        seen = run_client(s, "specialized", f"spec-{uuid.uuid4().hex[:6]}")
    assert seen["high_output"] == "hi\n"
    assert seen["default_after_2s"]["state"] == "PENDING"
    assert seen["default_info"]["state"] == "PENDING" and seen["default_info"]["ready"] is False
    cancel = seen["default_cancel"]
    assert cancel["cancelled"] is True and cancel["previous_state"] == "PENDING"
    assert cancel["message"] == "Task cancelled successfully (was pending in queue)"
    assert seen["default_revoked"]["state"] == "REVOKED"


def test_a_submission_with_test_cases_gets_them_in_its_result(shared_stack: Stack) -> None:
    result = run_client(shared_stack, "cases", f"shim-{uuid.uuid4().hex[:6]}")
    assert result["status"] == "completed" and result["verdict"] == "wrong_answer"
    assert (result["passed"], result["total"]) == (1, 2)
    assert [case["status"] for case in result["cases"]] == ["accepted", "wrong_answer"]
