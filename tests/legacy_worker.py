"""Test-only stand-in for the legacy Celery deployment's worker (real Celery, real executor).

Started by tests/e2e/test_migration.py as `celery -A tests.legacy_worker worker -Q evaluation,high_priority`.
Its task is the legacy one: `tasks.evaluate_code(eval_id, code, language)`, run on the
executor service, returning the result dict. Two markers let tests provoke what a real
legacy deployment might do: `LEGACY_CRASH` raises inside the task (Celery FAILURE), and
`LEGACY_DIFFERENT` changes the output (a shadow mismatch).
"""

from __future__ import annotations

import os
from typing import Any

import httpx
from celery import Celery

prefix = os.environ.get("LEGACY_KEY_PREFIX", "")
transport = {"global_keyprefix": prefix} if prefix else {}
app = Celery("legacy", broker=os.environ["LEGACY_BROKER_URL"], backend=os.environ["LEGACY_BROKER_URL"])
app.conf.update(
    task_track_started=True,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    broker_transport_options=transport,
    result_backend_transport_options=transport,
    worker_hijack_root_logger=False,
)


@app.task(name="tasks.evaluate_code")
def evaluate_code(eval_id: str, code: str, language: str = "python") -> dict[str, Any]:
    if "LEGACY_CRASH" in code:
        raise RuntimeError("legacy worker crashed")
    response = httpx.post(
        f"{os.environ['EXECUTOR_SERVICE_URL']}/execute",
        json={"eval_id": f"legacy-{eval_id}", "code": code, "language": language, "timeout": 30},
        headers={"authorization": f"Bearer {os.environ['EXECUTOR_SECRET']}"},
        timeout=60,
    )
    response.raise_for_status()
    result = response.json()
    output = result["output"] + ("(legacy differs)\n" if "LEGACY_DIFFERENT" in code else "")
    return {"eval_id": eval_id, "status": result["status"], "output": output, "error": result["error"],
            "exit_code": result["exit_code"]}  # fmt: skip
