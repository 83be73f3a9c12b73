"""Marks an evaluation `running` as a worker thread takes its message, before the actor starts.

Usually the broker's fetch has done it already, in the Lua call that took the message
(actors/broker.py puts what it did on the message as FETCH_MARK): no round trip of its own. Else
(a message enqueued by an earlier release, without its evaluation noted for the fetch) it is one
round trip here, in the worker thread with the broker's own client. `bench queue` measured the
cost of that round trip: a no-op task through our stack ran at 0.84x bare Dramatiq's rate
with it, 1.12x without.
A message whose evaluation is already cancelled or finished (an earlier delivery completed it)
is skipped: a run never happens twice. An evaluation with no record (sent straight to the
actor) is left to the actor, which records it first.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import structlog
from dramatiq.middleware import Middleware, SkipMessage

from evaluations.status import FETCH, Status
from evaluations.store import StatusChange, utc_now
from middleware.state import FETCH_MARK, UNRECORDED, attempt_of, eval_id_of, worker_name

log = structlog.get_logger(__name__)

#: Actor option: this actor works on an evaluation record (`eval_id`) and runs it.
RECORDS_STATUS = "records_status"


class MarkRunning(Middleware):
    """Before an evaluation's actor runs: `running` with start time, worker and attempt token.

    `forward(eval_id, change)` sends the change on (to the storage service) before the actor
    starts, so it arrives before the result; `on_skip(eval_id)` is told when a message is
    skipped (an earlier delivery may have failed only to tell the storage service).
    """

    def __init__(
        self,
        forward: Callable[[str, dict[str, Any]], None] | None = None,
        on_skip: Callable[[str], None] | None = None,
    ) -> None:
        self.forward = forward
        self.on_skip = on_skip

    @property
    def actor_options(self) -> set[str]:
        return {RECORDS_STATUS}

    def before_process_message(self, broker: Any, message: Any) -> None:
        actor = broker.actors.get(message.actor_name)
        eval_id = eval_id_of(message)
        if actor is None or not actor.options.get(RECORDS_STATUS) or eval_id is None:
            return
        mark = message.options.get(FETCH_MARK)
        stamp = mark or {"started_at": utc_now(), "worker": worker_name()}
        fields = {"started_at": stamp["started_at"], "worker": stamp["worker"], "next_retry_at": "",
                  "attempt": attempt_of(message)}  # fmt: skip
        if mark:
            applied, current = mark["applied"], mark.get("current", "")
        else:
            change = StatusChange.by(FETCH, eval_id, Status.RUNNING, fields)
            applied, current = broker.transition(change)
        if applied:
            if self.forward:
                self.forward(eval_id, {"status": "running", **fields})
            return
        if current == "":
            message.options[UNRECORDED] = True
            return
        log.info("evaluation.skipped", eval_id=eval_id, status=current)
        if self.on_skip:
            self.on_skip(eval_id)
        raise SkipMessage(f"evaluation {eval_id} is {current}")
