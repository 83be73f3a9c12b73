"""The `evaluate_code` and `health_check` actors (async, on Dramatiq's AsyncIO middleware).

Importing this module builds the process's broker; `actors.maintenance` holds the scheduled actors.
"""

from __future__ import annotations

import socket
from dataclasses import asdict
from typing import Any

import dramatiq
import structlog
from dramatiq.message import Message
from dramatiq.middleware import CurrentMessage

from actors.broker import QUEUE_NAME
from actors.runtime import runtime
from actors.setup import process_broker
from app.config import get_settings
from app.store import NewEvaluation, StatusChange, task_id_of, utc_now
from middleware.running import RECORDS_STATUS
from middleware.state import STATUS_CHANGE, UNRECORDED, attempt_of, worker_name

log = structlog.get_logger(__name__)

#: Actors bind to the broker when declared, so it must exist first.
broker = process_broker()

#: A stuck actor is interrupted this long after its run's own time-out; more than the
#: executor client waits beyond it (compile step and answer margin), so it never cuts a run short.
TIME_LIMIT_MARGIN_MS = 60_000


@dramatiq.actor(
    queue_name=QUEUE_NAME,
    time_limit=int(get_settings().max_timeout * 1000) + TIME_LIMIT_MARGIN_MS,
    **{RECORDS_STATUS: True},
)
async def evaluate_code(
    eval_id: str,
    code: str,
    language: str = "python",
    timeout: float | None = None,
    stdin: str | None = None,
    args: list[str] | None = None,
    memory_mb: int | None = None,
    output_limit: int | None = None,
) -> None:
    """Run one submission on an executor and store the finished result.

    Failures reaching the executor or storage raise, and the Backoff middleware retries them;
    the user's own failures (exit code, exception, time-out) are results, stored as such.
    """
    structlog.contextvars.bind_contextvars(eval_id=eval_id)
    rt = runtime()
    timeout = timeout or get_settings().default_timeout
    attempt = current_attempt()
    # The MarkRunning middleware has marked it running already; an evaluation sent straight
    # to the actor (Celery-style), never recorded by the API, is recorded here first.
    message = CurrentMessage.get_current_message()
    if message is not None and message.options.get(UNRECORDED):
        await _record_direct_submission(eval_id, code, language, timeout)
        running = {"started_at": utc_now(), "worker": worker_name(), "next_retry_at": "", "attempt": attempt}
        started, current = await rt.store.transition(eval_id, "running", ("queued",), **running)
        if not started:
            log.info("evaluation.skipped", status=current)
            return
    log.info("evaluation.running", language=language)
    payload = {"eval_id": eval_id, "code": code, "language": language, "timeout": timeout,
               "stdin": stdin, "args": args or [], "memory_mb": memory_mb,
               "output_limit": output_limit}  # fmt: skip
    executor, result = await rt.executors.execute(payload)
    if result["status"] == "cancelled" and not await _stopped_on_purpose(eval_id, attempt):
        raise RunInterrupted(f"the run was stopped on {executor} without a cancel")
    fields = {k: result[k] for k in RESULT_FIELDS}
    # The result commits with the ack, in one round trip: a newer delivery (this one taken for
    # dead) owns the record if the attempt token changed, and Dramatiq repeats the ack until
    # Redis answers, so a finished run is never lost to a Redis outage.
    fields.update(completed_at=utc_now(), executor=executor)
    settle_with(StatusChange(eval_id, result["status"], ("running",), fields, expect={"attempt": attempt}))
    log.info("evaluation.finished", status=result["status"], ms=result["runtime_ms"])


#: What the executor's answer gives the record.
RESULT_FIELDS = ("output", "error", "exit_code", "signal", "runtime_ms", "cpu_ms", "peak_memory_kb",
                 "output_truncated", "error_truncated")  # fmt: skip


def settle_with(change: StatusChange) -> None:
    """Have the worker commit `change` together with this message's ack (see PriorityBroker.settle)."""
    message = CurrentMessage.get_current_message()
    assert message is not None, "only inside an actor"
    message.options[STATUS_CHANGE] = asdict(change)


class RunInterrupted(Exception):
    """The executor stopped a run nobody cancelled (it was replaced or shut down): run it again."""


def current_attempt() -> str:
    """This delivery's attempt token (middleware/state.py: attempt_of): it tells deliveries apart."""
    message = CurrentMessage.get_current_message()
    return attempt_of(message) if message else ""


async def _stopped_on_purpose(eval_id: str, attempt: str) -> bool:
    """A `cancelled` run is expected when the evaluation was cancelled or a newer attempt took over."""
    record = await runtime().store.get(eval_id)
    return record is None or record["status"] == "cancelled" or record.get("attempt") != attempt


async def _record_direct_submission(eval_id: str, code: str, language: str, timeout: float) -> None:
    store = runtime().store
    async with store.client.pipeline(transaction=True) as pipe:
        store.write_new(
            pipe, NewEvaluation(eval_id, code, language, timeout, "default", False, {"source": "direct"})
        )
        await pipe.execute()


def evaluation_message(
    eval_id: str,
    code: str,
    language: str,
    timeout: float,
    stdin: str | None = None,
    args: list[str] | None = None,
    memory_mb: int | None = None,
    output_limit: int | None = None,
) -> Message:
    """The message for one evaluation; its id is the Celery-style task id. Optional arguments
    go in only when given, so such a message stays readable by workers that predate them."""
    kwargs: dict[str, object] = {"eval_id": eval_id, "code": code, "language": language, "timeout": timeout}
    optional = {"stdin": stdin, "args": args or None, "memory_mb": memory_mb, "output_limit": output_limit}
    kwargs.update({name: value for name, value in optional.items() if value is not None})
    return Message(
        queue_name=evaluate_code.queue_name,
        actor_name=evaluate_code.actor_name,
        args=(),
        kwargs=kwargs,
        options={"time_limit": int(timeout * 1000) + TIME_LIMIT_MARGIN_MS},
        message_id=task_id_of(eval_id),
    )


@dramatiq.actor(queue_name=QUEUE_NAME, queue_level="high", store_results=True)
async def health_check() -> dict[str, Any]:
    """Proves a worker is consuming: answers from whichever worker takes it."""
    return {"status": "healthy", "worker": socket.gethostname()}
