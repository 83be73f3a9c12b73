"""An evaluation's statuses and the one table of which status may follow which.

Every status change names a `Transition` from `TRANSITIONS`; the guarded Lua function that
applies it (`lua/status.lua`'s `transition()`) refuses the change unless the record is in one
of the transition's `allowed_from` statuses. The broker's script (`actors/lua/dispatch.lua`)
spells the two changes it makes itself; a unit test holds them to this table.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class Status(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMEOUT = "timeout"
    MEMORY_LIMIT_EXCEEDED = "memory_limit_exceeded"
    OUTPUT_LIMIT_EXCEEDED = "output_limit_exceeded"
    COMPILE_ERROR = "compile_error"


#: Final statuses. Beyond the Celery platform's four: the run's own limits, and compile errors.
TERMINAL: tuple[str, ...] = (
    Status.COMPLETED,
    Status.FAILED,
    Status.CANCELLED,
    Status.TIMEOUT,
    Status.MEMORY_LIMIT_EXCEEDED,
    Status.OUTPUT_LIMIT_EXCEEDED,
    Status.COMPILE_ERROR,
)
STATUSES: tuple[str, ...] = (Status.QUEUED, Status.RUNNING, *TERMINAL)


@dataclass(frozen=True)
class Transition:
    """One kind of status change: the statuses it may set, and those it may leave.

    An `allowed_from` entry "running+next_retry_at" allows "running" only while that field of
    the record is set (an evaluation waiting for its retry, not one whose run is under way).
    """

    name: str
    to: tuple[str, ...]
    allowed_from: tuple[str, ...]

    def check(self, status: str) -> None:
        if status not in self.to:
            raise ValueError(f"{self.name} cannot set status {status!r}; it sets {self.to}")


def _table(*transitions: Transition) -> dict[str, Transition]:
    return {t.name: t for t in transitions}


#: Which status may follow which, by the change that makes it.
TRANSITIONS: dict[str, Transition] = _table(
    # a worker's fetch takes a queued evaluation (a redelivered one is running already)
    Transition("fetch", (Status.RUNNING,), (Status.QUEUED, Status.RUNNING)),
    # a run starts that no fetch marked: a message sent straight to the actor, a legacy task
    Transition("start", (Status.RUNNING,), (Status.QUEUED,)),
    # a run's result, committed with the ack of the delivery that ran it ("cancelled": the
    # executor stopped it for a cancel)
    Transition("finish", TERMINAL, (Status.RUNNING,)),
    # a stopping worker gives its message back
    Transition("hand_back", (Status.QUEUED,), (Status.RUNNING,)),
    # a failed attempt waits for its retry (running, with next_retry_at set)
    Transition("wait_for_retry", (Status.RUNNING,), (Status.RUNNING, Status.QUEUED)),
    # retries exhausted, or a failure no policy retries: ours, never the program's
    Transition("give_up", (Status.FAILED,), (Status.QUEUED, Status.RUNNING)),
    # an operator retries a dead letter
    Transition("retry_dead_letter", (Status.QUEUED,), (Status.FAILED,)),
    # cancels, by the Celery state the caller saw
    Transition("cancel_pending", (Status.CANCELLED,), (Status.QUEUED,)),
    Transition("cancel_retrying", (Status.CANCELLED,), ("running+next_retry_at",)),
    Transition("cancel_running", (Status.CANCELLED,), (Status.RUNNING,)),
    Transition("cancel_legacy", (Status.CANCELLED,), (Status.QUEUED, Status.RUNNING)),
    # the legacy Celery deployment ran it: its outcome, or its revoke
    Transition("legacy_finish", TERMINAL, (Status.QUEUED, Status.RUNNING)),
)

FETCH = TRANSITIONS["fetch"]
START = TRANSITIONS["start"]
FINISH = TRANSITIONS["finish"]
HAND_BACK = TRANSITIONS["hand_back"]
WAIT_FOR_RETRY = TRANSITIONS["wait_for_retry"]
GIVE_UP = TRANSITIONS["give_up"]
RETRY_DEAD_LETTER = TRANSITIONS["retry_dead_letter"]
LEGACY_FINISH = TRANSITIONS["legacy_finish"]
CANCEL_LEGACY = TRANSITIONS["cancel_legacy"]
#: Which transition a cancel uses, by the Celery state the caller saw.
CANCEL_BY_STATE: dict[str, Transition] = {
    "PENDING": TRANSITIONS["cancel_pending"],
    "RETRY": TRANSITIONS["cancel_retrying"],
    "STARTED": TRANSITIONS["cancel_running"],
}

#: How the Celery compatibility layer names each status (RETRY: running, waiting to retry).
CELERY_STATES: dict[str, str] = {
    Status.QUEUED: "PENDING",
    Status.RUNNING: "STARTED",
    Status.COMPLETED: "SUCCESS",
    Status.TIMEOUT: "SUCCESS",
    Status.MEMORY_LIMIT_EXCEEDED: "SUCCESS",
    Status.OUTPUT_LIMIT_EXCEEDED: "SUCCESS",
    Status.COMPILE_ERROR: "SUCCESS",
    Status.FAILED: "FAILURE",
    Status.CANCELLED: "REVOKED",
}


def celery_state(record: dict[str, Any]) -> str:
    """The Celery task state of an evaluation record."""
    if record["status"] == Status.RUNNING and record.get("next_retry_at"):
        return "RETRY"
    return CELERY_STATES[record["status"]]
