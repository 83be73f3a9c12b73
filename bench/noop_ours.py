"""A no-op task through Crucible's whole worker stack, for bench/queue_overhead.py.

The broker and middleware are the production ones (priority routing, backoff, dead letters,
results, worker stats, periodiq); the task writes the status records an evaluation writes
(queued → running, then completed with the ack, attempt-guarded) but runs no sandbox, then counts itself done.
"""

from __future__ import annotations

import dramatiq

from actors.broker import QUEUE_NAME
from actors.evaluate import broker, current_attempt, settle_with
from actors.runtime import runtime
from app.store import StatusChange
from middleware.running import RECORDS_STATUS

assert broker is not None  # the production broker exists before the actor is declared


@dramatiq.actor(queue_name=QUEUE_NAME, **{RECORDS_STATUS: True})  # MarkRunning marks it running
async def noop(eval_id: str, done_key: str) -> None:
    attempt = current_attempt()
    settle_with(StatusChange(eval_id, "completed", ("running",), {"output": ""}, expect={"attempt": attempt}))
    await runtime().redis.incr(done_key)
