"""An evaluation as callers see it: the view `GET /api/eval/{id}` answers and webhooks send,
and what of it each key may see."""

from __future__ import annotations

from typing import Any

from evaluations.api_keys import ApiKey
from evaluations.status import celery_state


def public_view(record: dict[str, Any]) -> dict[str, Any]:
    """An evaluation as the contract shows it, plus what else a caller may want (and, for a
    submission with test cases, its verdict and each case's result)."""
    view = {
        "eval_id": record["id"],
        "task_id": record.get("task_id"),
        "status": record["status"],
        "celery_state": celery_state(record),
        "success": record["status"] == "completed",
        "language": record.get("language"),
        "code": record.get("code"),
        "created_at": record.get("created_at"),
        "started_at": record.get("started_at"),
        "completed_at": record.get("completed_at"),
        "output": record.get("output"),
        "error": record.get("error"),
        "exit_code": record.get("exit_code"),
        "signal": record.get("signal"),
        "runtime_ms": record.get("runtime_ms"),
        "cpu_ms": record.get("cpu_ms"),
        "peak_memory_kb": record.get("peak_memory_kb"),
        "output_truncated": record.get("output_truncated", False),
        "error_truncated": record.get("error_truncated", False),
        # failed for a reason of ours (retries exhausted reaching a service), not the program's
        "internal_error": record.get("internal_error", False),
        "queue": record.get("queue"),
        "worker": record.get("worker"),
        "executor": record.get("executor"),
        "retries": record.get("retries", 0),
        "retrying": celery_state(record) == "RETRY",
        "next_retry_at": record.get("next_retry_at"),
        "queue_system": record.get("queue_system") or "dramatiq",
    }
    if record.get("total") is not None:
        view.update({k: record.get(k) for k in ("verdict", "passed", "total", "cases", "compile")})
    if record.get("callback_url"):
        view["callback"] = callback_view(record)
    return view


def callback_view(record: dict[str, Any]) -> dict[str, Any]:
    """Where an evaluation's webhook goes and how its delivery stands (actors/callbacks.py):
    `waiting` (not finished yet), `due`, `retrying`, `delivered`, `failed` (dead-lettered after
    its last retry) or `refused` (its host may not be reached)."""
    return {
        "url": record.get("callback_url"),
        "status": record.get("callback_status") or "waiting",
        "attempts": int(record.get("callback_attempts") or 0),
        "last_error": record.get("callback_last_error") or None,
        "delivered_at": record.get("callback_delivered_at") or None,
    }


#: Names of our machines (executor URLs, worker hosts): operators see them, other callers do not.
INTERNAL_FIELDS = frozenset({"executor", "worker"})


def for_caller(data: dict[str, Any], key: ApiKey | None) -> dict[str, Any]:
    """A record's view or a status change as `key` may see it. For a key that is not an
    admin's, without internal addresses, and a failure of ours (`internal_error`) by its kind
    only: its text names executors and hosts; the DLQ entry and the logs keep it whole."""
    if key is not None and key.is_admin:
        return data
    shown = {name: value for name, value in data.items() if name not in INTERNAL_FIELDS}
    if shown.get("internal_error") and shown.get("error"):
        kind = str(shown["error"]).split(":", 1)[0]
        shown["error"] = f"{kind}: the service failed to run this evaluation (not the program's fault)"
    return shown
