"""A no-op task through Crucible's whole worker stack, for bench/queue_overhead.py.

The broker and middleware are the production ones (priority routing, backoff, dead letters,
results, worker stats, periodiq); the task writes the status records an evaluation writes
(queued → running, then completed with the ack, attempt-guarded) but runs no sandbox, then counts itself done.
"""

from __future__ import annotations

import dramatiq

from actors.evaluate import current_attempt, settle_with
from actors.runtime import WorkerRuntime
from actors.worker import process_worker
from evaluations.queue import QUEUE_NAME
from evaluations.status import FINISH
from evaluations.store import StatusChange
from middleware.running import RECORDS_STATUS


async def noop(runtime: WorkerRuntime, eval_id: str, done_key: str) -> None:
    attempt = current_attempt()
    settle_with(StatusChange.by(FINISH, eval_id, "completed", {"output": ""}, expect={"attempt": attempt}))
    await runtime.resources().redis.incr(done_key)


def main() -> None:
    """The production worker, plus the no-op actor (MarkRunning marks it running)."""
    worker = process_worker()
    noop_actor = worker.runtime.bind(noop)
    dramatiq.actor(noop_actor, broker=worker.broker, queue_name=QUEUE_NAME, **{RECORDS_STATUS: True})
