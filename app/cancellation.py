"""Cancelling an evaluation, with the Celery service's answers case by case.

- queued (PENDING): its message is removed from the queue in the same transaction that marks
  it cancelled, so it never runs, however long it waited;
- waiting to retry (RETRY): the delayed message is removed the same way; the retry chain stops;
- running (STARTED): refused unless `terminate`; then marked cancelled and its sandbox killed
  on whichever executor runs it (executors that do not have it refuse to start it later);
- finished or already cancelled: refused.
An evaluation routed to the legacy Celery deployment is judged by its state there (read
fresh from its result backend) and stopped with Celery's revoke.
The status change is guarded, so a cancel racing the run's end leaves one final status.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import httpx
import redis.asyncio as aioredis
import structlog

from actors.broker import AsyncEnqueuer
from actors.executor_client import ExecutorPool
from app.migration.legacy import LegacyCelery
from evaluations.queue import task_id_of
from evaluations.status import CANCEL_BY_STATE, CANCEL_LEGACY, TERMINAL, Status, Transition, celery_state
from evaluations.store import EvaluationStore, StatusChange, utc_now

log = structlog.get_logger(__name__)

DONE_MESSAGES = {
    "PENDING": "Task cancelled successfully (was pending in queue)",
    "RETRY": "Task cancelled successfully (retry chain stopped)",
    "STARTED": "Task forcefully terminated (was running)",
}
RUNNING_REFUSAL = "Task is already running. Use terminate=true to force stop."
#: A status may change between our read and our write (the run starts or ends): look again.
ATTEMPTS = 3


@dataclass(frozen=True)
class CancelOutcome:
    """The contract's answer of `cancel_celery_task`."""

    eval_id: str
    task_id: str
    previous_state: str
    cancelled: bool
    message: str

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


class Canceller:
    """Cancels evaluations; shared by the API and the Celery compatibility layer."""

    def __init__(
        self,
        client: aioredis.Redis,
        store: EvaluationStore,
        enqueuer: AsyncEnqueuer,
        executors: ExecutorPool,
        legacy: LegacyCelery | None = None,
    ) -> None:
        self.client = client
        self.store = store
        self.enqueuer = enqueuer
        self.executors = executors
        self.legacy = legacy

    async def cancel(self, eval_id: str, terminate: bool = False) -> CancelOutcome | None:
        """Cancel `eval_id`; None if there is no such evaluation."""
        task_id = task_id_of(eval_id)
        for _ in range(ATTEMPTS):
            record = await self.store.get(eval_id)
            if record is None:
                return None
            on_legacy = record.get("queue_system") == "legacy" and self.legacy is not None
            # A legacy task's state is Celery's until our record is final (cancelled here, or
            # its result already copied over).
            final = record["status"] in TERMINAL
            state = await self._legacy_state(task_id) if on_legacy and not final else celery_state(record)
            refusal = self._refusal(state, terminate)
            if refusal:
                return CancelOutcome(eval_id, task_id, state, False, refusal)
            transition = CANCEL_LEGACY if on_legacy else CANCEL_BY_STATE[state]
            if on_legacy:  # first, so a broker error leaves the task and its record as they were
                await self.legacy.revoke(task_id, terminate=state != "PENDING")
            if await self._cancel_from(eval_id, task_id, transition):
                if state == "STARTED" and not on_legacy:
                    killed = await self.executors.kill_everywhere(eval_id)
                    log.info("evaluation.terminated", eval_id=eval_id, sandbox_killed=killed)
                await self._tell_storage(eval_id)
                return CancelOutcome(eval_id, task_id, state, True, DONE_MESSAGES[state])
        return CancelOutcome(eval_id, task_id, state, False, "Task state kept changing; try again")

    @staticmethod
    def _refusal(state: str, terminate: bool) -> str | None:
        if state in ("SUCCESS", "FAILURE"):
            return f"Task already completed with state: {state}"
        if state == "REVOKED":
            return "Task was already cancelled"
        if state == "STARTED" and not terminate:
            return RUNNING_REFUSAL
        return None

    async def _legacy_state(self, task_id: str) -> str:
        """The task's Celery state in the legacy deployment (PENDING until it stores one)."""
        assert self.legacy is not None
        found = (await self.legacy.states([task_id]))[task_id]
        known = ("STARTED", "RETRY", "SUCCESS", "FAILURE", "REVOKED")
        return found.state if found and found.state in known else "PENDING"  # e.g. RECEIVED

    async def _cancel_from(self, eval_id: str, task_id: str, transition: Transition) -> bool:
        """Mark cancelled and drop any waiting message, in one transaction."""
        fields = {"completed_at": utc_now(), "error": "Cancelled by request", "next_retry_at": ""}
        change = StatusChange.by(transition, eval_id, Status.CANCELLED, fields)
        async with self.client.pipeline(transaction=True) as pipe:
            await self.store.transition_in(pipe, change)
            await self.enqueuer.dispatch_in(pipe, "cancel", task_id)
            (done, _), _removed = await pipe.execute()
        return bool(done)

    async def _tell_storage(self, eval_id: str) -> None:
        try:
            await self.store.forward_current(eval_id)
        except httpx.HTTPError as exc:  # the cancel stands; the storage service is told best-effort
            log.warning("storage.forward_failed", eval_id=eval_id, error=str(exc))
