"""A Celery-era caller, run as its own process by tests/e2e/test_celery_shim.py.

It uses only what the old worker's README shows (`from tasks import ...`), configured by the
environment (REDIS_URL, CRUCIBLE_NAMESPACE), and prints what it observed as one JSON object.
Usage: python tests/shim_client.py <scenario> <eval_id prefix>
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from tasks import (
    AsyncResult,
    cancel_celery_task,
    evaluate_code,
    get_celery_task_info,
    health_check,
)


def surface(handle: Any) -> dict[str, Any]:
    return {
        "id": handle.id,
        "state": handle.state,
        "status": handle.status,
        "ready": handle.ready(),
        "successful": handle.successful(),
        "failed": handle.failed(),
    }


def raised(call: Any) -> str | None:
    try:
        call()
    except Exception as exc:
        return f"{type(exc).__module__}.{type(exc).__name__}"
    return None


def wait_state(handle: Any, state: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while handle.state != state and time.monotonic() < deadline:
        time.sleep(0.05)


def lifecycle(prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    ok = evaluate_code.delay(eval_id=f"{prefix}-ok", code="print('Hello')", language="python")
    out["ok_result"] = ok.get(timeout=30)
    out["ok"] = surface(ok)

    high = evaluate_code.apply_async(
        kwargs={"eval_id": f"{prefix}-high", "code": "print(2)", "language": "python"}, queue="high_priority"
    )
    low = evaluate_code.apply_async(
        kwargs={"eval_id": f"{prefix}-low", "code": "print(3)", "language": "python"}, priority=1
    )
    out["high_low_results"] = [high.get(timeout=30)["output"], low.get(timeout=30)["output"]]

    bad = evaluate_code.delay(eval_id=f"{prefix}-bad", code="raise ValueError('boom')", language="python")
    out["bad_get_raises"] = raised(lambda: bad.get(timeout=30))
    out["bad_get_no_propagate"] = type(bad.get(timeout=30, propagate=False)).__name__
    out["bad"] = surface(bad)
    out["bad_traceback"] = bad.traceback
    out["bad_info"] = get_celery_task_info(f"{prefix}-bad")

    slow = evaluate_code.delay(
        eval_id=f"{prefix}-slow", code="import time; time.sleep(30)", language="python"
    )
    wait_state(slow, "STARTED")
    out["slow_started"] = surface(slow)
    out["slow_timeout_raises"] = raised(lambda: slow.get(timeout=0.5))
    out["slow_cancel_refused"] = cancel_celery_task(f"{prefix}-slow")
    slow.revoke(terminate=True)
    out["slow_revoked"] = surface(slow)
    out["slow_get_raises"] = raised(lambda: slow.get(timeout=10))
    out["slow_cancel_again"] = cancel_celery_task(f"{prefix}-slow", terminate=True)
    out["ok_cancel"] = cancel_celery_task(f"{prefix}-ok")
    out["missing_cancel"] = cancel_celery_task(f"{prefix}-missing")
    out["missing_info"] = get_celery_task_info(f"{prefix}-missing")
    out["ok_info"] = get_celery_task_info(f"{prefix}-ok")
    out["health"] = health_check.delay().get(timeout=10)
    out["refused"] = {
        name: refusal(lambda n=name, kw=kw: evaluate_code.delay(eval_id=f"{prefix}-{n}", **kw))
        for name, kw in {
            "empty": {"code": "  "},
            "surrogate": {"code": "print('\udcff')"},  # what Celery's JSON would carry
            "language": {"code": "print(1)", "language": "cobol"},
            "timeout": {"code": "print(1)", "timeout": 10**6},
        }.items()
    }
    return out


def refusal(call: Any) -> str | None:
    """The message of the ValueError `call` raised (None if it raised nothing)."""
    try:
        call()
    except ValueError as exc:
        return str(exc)
    return None


def rebuild(prefix: str) -> dict[str, Any]:
    handle = AsyncResult(f"celery-{prefix}-ok")
    return {"surface": surface(handle), "result": handle.result}


def specialized(prefix: str) -> dict[str, Any]:
    """Against a worker started with CELERY_QUEUES=high_priority."""
    out: dict[str, Any] = {}
    high = evaluate_code.apply_async(
        kwargs={"eval_id": f"{prefix}-high", "code": "print('hi')", "language": "python"},
        queue="high_priority",
    )
    out["high_output"] = high.get(timeout=30)["output"]
    default = evaluate_code.delay(eval_id=f"{prefix}-default", code="print('never')", language="python")
    time.sleep(2)
    out["default_after_2s"] = surface(default)
    out["default_info"] = get_celery_task_info(f"{prefix}-default")
    out["default_cancel"] = cancel_celery_task(f"{prefix}-default")
    out["default_revoked"] = surface(default)
    return out


def cases(prefix: str) -> dict[str, Any]:
    """A submission with test cases, through the shim: `.get()` holds the verdict and cases."""
    tests = [{"stdin": "1", "expected_output": "2"}, {"stdin": "2", "expected_output": "5"}]
    handle = evaluate_code.delay(eval_id=f"{prefix}-cases", code="print(int(input()) * 2)", tests=tests)
    return handle.get(timeout=60)


if __name__ == "__main__":
    scenario, prefix = sys.argv[1], sys.argv[2]
    scenarios = {"lifecycle": lifecycle, "rebuild": rebuild, "specialized": specialized, "cases": cases}
    print(json.dumps(scenarios[scenario](prefix)))
