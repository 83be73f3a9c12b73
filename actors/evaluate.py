"""The `evaluate_code` and `health_check` actors' functions (async, on Dramatiq's AsyncIO middleware).

Plain functions of the worker's runtime: `actors.worker.build_worker` binds them to the one it
makes and declares them on the broker it builds, so importing this module builds nothing.
`actors.maintenance` holds the scheduled ones.
"""

from __future__ import annotations

import socket
from dataclasses import asdict
from typing import Any

import structlog
from dramatiq.middleware import CurrentMessage

from actors.live_output import LivePublisher
from actors.runtime import WorkerRuntime
from evaluations.status import FINISH, START, Status
from evaluations.store import EvaluationStore, NewEvaluation, StatusChange, utc_now
from evaluations.submission_spec import RunSpec
from middleware.state import PUBLISH, STATUS_CHANGE, UNRECORDED, attempt_of, worker_name

log = structlog.get_logger(__name__)


async def evaluate_code(
    runtime: WorkerRuntime,
    eval_id: str,
    code: str,
    language: str = "python",
    timeout: float | None = None,
    stdin: str | None = None,
    args: list[str] | None = None,
    memory_mb: int | None = None,
    output_limit: int | None = None,
    wall_timeout: float | None = None,
    files: list[dict[str, str]] | None = None,
    entry: str | None = None,
    tests: list[dict[str, Any]] | None = None,
    checker: str | dict[str, Any] | None = None,
    stop_on_first_failure: bool = False,
) -> None:
    """Run one submission on an executor and store the finished result.

    Failures reaching the executor or storage raise, and the Backoff middleware retries them;
    the user's own failures (exit code, exception, time-out) are results, stored as such.
    """
    structlog.contextvars.bind_contextvars(eval_id=eval_id)
    rt = runtime.resources()
    timeout = timeout or runtime.settings.default_timeout
    attempt = current_attempt()
    # The MarkRunning middleware has marked it running already; an evaluation sent straight
    # to the actor (Celery-style), never recorded by the API, is recorded here first.
    message = CurrentMessage.get_current_message()
    if message is not None and message.options.get(UNRECORDED):
        await _record_direct_submission(rt.store, eval_id, code, language, timeout)
        running = {"started_at": utc_now(), "worker": worker_name(), "next_retry_at": "", "attempt": attempt}
        started, current = await rt.store.transition(eval_id, Status.RUNNING, START.allowed_from, **running)
        if not started:
            log.info("evaluation.skipped", status=current)
            return
    log.info("evaluation.running", language=language)
    given = {"stdin": stdin, "args": args, "memory_mb": memory_mb, "output_limit": output_limit,
             "wall_timeout": wall_timeout, "files": files, "entry": entry, "tests": tests, "checker": checker,
             "stop_on_first_failure": stop_on_first_failure}  # fmt: skip
    run = RunSpec.from_fields({"code": code, "language": language, "timeout": timeout, **given})
    payload = {"eval_id": eval_id, **run.fields()}
    # A run without test cases streams its output to followers as it runs (never stored).
    live = None if run.tests else LivePublisher(rt.store.client, rt.store.keys.events_of(eval_id), eval_id)
    try:
        executor, result = await rt.executors.execute(payload, run.total_wall, live.add if live else None)
    except BaseException:
        if live:
            live.abandon()
        raise
    trailing = await live.finish() if live else []
    if result["status"] == "cancelled" and not await _stopped_on_purpose(rt.store, eval_id, attempt):
        raise RunInterrupted(f"the run was stopped on {executor} without a cancel")
    fields = {k: result[k] for k in RESULT_FIELDS}
    fields.update({k: result[k] for k in CASES_FIELDS if k in result})
    # The result commits with the ack, in one round trip: a newer delivery (this one taken for
    # dead) owns the record if the attempt token changed, and Dramatiq repeats the ack until
    # Redis answers, so a finished run is never lost to a Redis outage.
    fields.update(completed_at=utc_now(), executor=executor)
    finished = StatusChange.by(FINISH, eval_id, result["status"], fields, expect={"attempt": attempt})
    settle_with(finished, trailing)  # the live output's last chunks are published just before it
    log.info("evaluation.finished", status=result["status"], ms=result["runtime_ms"])


#: What the executor's answer gives the record.
RESULT_FIELDS = ("output", "error", "exit_code", "signal", "runtime_ms", "cpu_ms", "peak_memory_kb",
                 "output_truncated", "error_truncated")  # fmt: skip
#: What it adds for a submission with test cases.
CASES_FIELDS = ("verdict", "passed", "total", "cases", "compile", "internal_error")


def settle_with(change: StatusChange, publish: list[tuple[str, str]] | None = None) -> None:
    """Have the worker commit `change` together with this message's ack (see PriorityBroker.settle),
    after publishing `publish` ((channel, message) pairs) in the same MULTI."""
    message = CurrentMessage.get_current_message()
    assert message is not None, "only inside an actor"
    message.options[STATUS_CHANGE] = asdict(change)
    if publish:
        message.options[PUBLISH] = [list(pair) for pair in publish]


class RunInterrupted(Exception):
    """The executor stopped a run nobody cancelled (it was replaced or shut down): run it again."""


def current_attempt() -> str:
    """This delivery's attempt token (middleware/state.py: attempt_of): it tells deliveries apart."""
    message = CurrentMessage.get_current_message()
    return attempt_of(message) if message else ""


async def _stopped_on_purpose(store: EvaluationStore, eval_id: str, attempt: str) -> bool:
    """A `cancelled` run is expected when the evaluation was cancelled or a newer attempt took over."""
    record = await store.get(eval_id)
    return record is None or record["status"] == "cancelled" or record.get("attempt") != attempt


async def _record_direct_submission(
    store: EvaluationStore, eval_id: str, code: str, language: str, timeout: float
) -> None:
    async with store.client.pipeline(transaction=True) as pipe:
        store.write_new(
            pipe, NewEvaluation(eval_id, code, language, timeout, "default", False, {"source": "direct"})
        )
        await pipe.execute()


async def health_check() -> dict[str, Any]:
    """Proves a worker is consuming: answers from whichever worker takes it."""
    return {"status": "healthy", "worker": socket.gethostname()}
