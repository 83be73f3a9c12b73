"""The Celery compatibility layer: the old worker's calls and answers, backed by Dramatiq.

Thin on purpose: it translates names (queues, priorities, task ids) and states, and calls
the same services the API uses (`Submitter`, `Canceller`, the DLQ, the evaluation store).
The top-level modules `tasks` and `retry_config` re-export what callers import.

    from tasks import evaluate_code
    result = evaluate_code.delay(eval_id="abc123", code="print('Hello')", language="python")
    result.get(timeout=30)       # {"eval_id": "abc123", "status": "completed", "output": "Hello\\n", ...}
"""

from __future__ import annotations

import asyncio
import builtins
import functools
import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import dramatiq
from dramatiq.message import Message
from dramatiq.results import ResultFailure, ResultMissing, Results, ResultTimeout
from dramatiq.results.backends import RedisBackend

from actors import evaluate as _actors
from actors.worker import DeclaredActors, process_worker
from app.celery.blocking import blocking_services
from app.services import Services
from app.submission_input import offered_languages, parse_submission
from evaluations.errors import Refusal
from evaluations.queue import LEVEL_ALIASES, LEVEL_OPTION, eval_id_of_task, level_of_priority, task_id_of
from evaluations.status import celery_state
from infra.settings import get_settings

try:  # callers may catch Celery's own exceptions; they do when celery is installed
    from celery.exceptions import TaskRevokedError as _RevokedBase
    from celery.exceptions import TimeoutError as _TimeoutBase
except ImportError:  # pragma: no cover - depends on the install
    _RevokedBase, _TimeoutBase = Exception, TimeoutError  # type: ignore[misc,assignment]

READY_STATES = frozenset({"SUCCESS", "FAILURE", "REVOKED"})
#: What a successful evaluation's `.result` / `.get()` holds.
RESULT_FIELDS = ("eval_id", "status", "output", "error", "exit_code", "runtime_ms", "output_truncated")
#: What it adds for a submission with test cases.
CASES_FIELDS = ("verdict", "passed", "total", "cases")


class TimeoutError(_TimeoutBase):
    """`.get(timeout=...)` ran out before the task was ready."""


class TaskRevokedError(_RevokedBase):
    """The task was cancelled (Celery: revoked)."""


class EvaluationFailed(Exception):
    """An evaluation ended `failed`: the final error after retries (see `.traceback`)."""


def level_for(queue: str | None, priority: int | bool | None) -> str:
    """Celery's queue name or numeric priority (high_priority 10, evaluation 5, batch 1) → our level."""
    if queue is not None:
        if queue not in LEVEL_ALIASES:
            raise ValueError(f"unknown queue {queue!r}; known: {sorted(LEVEL_ALIASES)}")
        return LEVEL_ALIASES[queue]
    if priority is None:
        return "default"
    if isinstance(priority, bool):
        return "high" if priority else "default"
    return level_of_priority(priority)


# -- evaluations ---------------------------------------------------------------------------


@functools.cache
def _languages() -> dict[str, str]:
    return offered_languages(get_settings())


class _Handle:
    """What Celery's AsyncResult derives from its state; subclasses say where the state is."""

    state: str

    @property
    def status(self) -> str:
        return self.state

    def ready(self) -> bool:
        return self.state in READY_STATES

    def successful(self) -> bool:
        return self.state == "SUCCESS"

    def failed(self) -> bool:
        return self.state == "FAILURE"


class EvaluationResult(_Handle):
    """Celery's AsyncResult surface for one evaluation, read from its record."""

    def __init__(self, task_id: str) -> None:
        self.id = self.task_id = task_id
        self.eval_id = eval_id_of_task(task_id)
        self._services = blocking_services()

    def __repr__(self) -> str:
        return f"<EvaluationResult: {self.id}>"

    def _record(self) -> dict[str, Any] | None:
        return self._services.call(lambda s: s.store.get(self.eval_id))

    @property
    def state(self) -> str:
        record = self._record()
        return celery_state(record) if record else "PENDING"  # Celery: unknown ids are PENDING

    @property
    def result(self) -> Any:
        """SUCCESS: the result dict; FAILURE / REVOKED: the exception, as Celery gives it."""
        record = self._record()
        return _outcome(record) if record else None

    @property
    def traceback(self) -> str | None:
        """The final failure's traceback: the dead-letter entry's, the legacy backend's, or
        the program's own (its stderr) when the user's code failed."""
        record = self._record()
        if not record or celery_state(record) != "FAILURE":
            return None
        entry = self._services.call(lambda s: s.dlq.get_task(self.task_id))
        return (entry or {}).get("traceback") or record.get("traceback") or record.get("error")

    def get(self, timeout: float | None = None, propagate: bool = True, interval: float = 0.5) -> Any:
        """Wait until the evaluation is final; return its result or raise as Celery does."""
        try:
            record = self._services.call(lambda s: _final_record(s, self.eval_id, timeout))
        except TimeoutError:
            raise TimeoutError(f"the operation timed out: {self.id} not ready after {timeout}s") from None
        outcome = _outcome(record)
        if propagate and isinstance(outcome, Exception):
            raise outcome
        return outcome

    def revoke(self, terminate: bool = False, signal: str | None = None) -> None:
        """Cancel it (the contract's cancellation; `signal` is accepted and ignored)."""
        self._services.call(lambda s: s.canceller.cancel(self.eval_id, terminate))


async def _final_record(services: Services, eval_id: str, timeout: float | None) -> dict[str, Any]:
    """Follow the evaluation's status events until a final one (no polling)."""
    try:
        async with asyncio.timeout(timeout):
            async for _ in services.streams.follow(eval_id):
                pass
    except builtins.TimeoutError:
        raise TimeoutError from None
    record = await services.store.get(eval_id)
    assert record is not None
    return record


def _outcome(record: dict[str, Any]) -> Any:
    state = celery_state(record)
    if state == "FAILURE":
        return EvaluationFailed(record.get("error") or "evaluation failed")
    if state == "REVOKED":
        return TaskRevokedError(record.get("error") or "cancelled")
    if state != "SUCCESS":
        return None
    result = {"eval_id": record["id"], **{k: record.get(k) for k in RESULT_FIELDS[1:]}}
    if record.get("total") is not None:
        result.update({k: record.get(k) for k in CASES_FIELDS})
    return result


class _CeleryTask:
    """Celery's calling surface over a subclass's `apply_async`."""

    def apply_async(self, args: Iterable[Any] | None = None, kwargs: Mapping[str, Any] | None = None,
                    **options: Any) -> Any:  # fmt: skip
        raise NotImplementedError

    def delay(self, *args: Any, **kwargs: Any) -> Any:
        return self.apply_async(args, kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Celery runs a task called directly in-process; here it is submitted and awaited."""
        return self.delay(*args, **kwargs).get()


class EvaluateTask(_CeleryTask):
    """`tasks.evaluate_code`: `.delay()` / `.apply_async()` submit through the same path as the API."""

    name = "tasks.evaluate_code"
    #: the actor's arguments as callers give them (the worker's runtime, bound by the worker, left out)
    _signature = inspect.signature(functools.partial(_actors.evaluate_code, None))

    def apply_async(
        self,
        args: Iterable[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        *,
        priority: int | bool | None = None,
        queue: str | None = None,
        countdown: float | None = None,
        eta: Any = None,
        **options: Any,
    ) -> EvaluationResult:
        if countdown is not None or eta is not None:
            raise NotImplementedError(
                "countdown/eta are not supported: evaluations start when a worker is free"
            )
        call = self._signature.bind(*(args or ()), **(kwargs or {}))
        level = level_for(queue, priority)
        # checked as the API checks a request body: what it refuses is refused here, by field
        body = {name: value for name, value in call.arguments.items() if value is not None}
        if isinstance(body.get("args"), tuple):  # Celery's JSON turned tuples into lists
            body["args"] = list(body["args"])
        try:
            sub = parse_submission({**body, "priority": level == "high"}, get_settings(), _languages())
        except Refusal as exc:
            raise ValueError(exc.message) from None
        services = blocking_services()
        try:
            services.call(lambda s: s.submitter.submit(sub, level, "celery-shim", system="dramatiq"))
        except Refusal as exc:  # a duplicate eval_id
            raise ValueError(exc.message) from None
        return EvaluationResult(task_id_of(sub.eval_id))


# -- other actors --------------------------------------------------------------------------


def _results_backend() -> RedisBackend:
    for middleware in process_worker().broker.middleware:
        if isinstance(middleware, Results):
            return middleware.backend
    raise RuntimeError("the broker has no Results middleware")


class ActorResult(_Handle):
    """Celery's AsyncResult surface for a plain actor's message (health_check, cleanup...)."""

    def __init__(self, message: Message) -> None:
        self.message = message
        self.id = self.task_id = message.message_id

    def __repr__(self) -> str:
        return f"<ActorResult: {self.id}>"

    def _fetch(self, block: bool, timeout: float | None = None) -> tuple[str, Any]:
        try:
            ms = None if timeout is None else int(timeout * 1000)
            return "SUCCESS", self.message.get_result(backend=_results_backend(), block=block, timeout=ms)
        except ResultMissing:
            return "PENDING", None
        except ResultFailure as exc:
            return "FAILURE", exc

    @property
    def state(self) -> str:
        return self._fetch(block=False)[0]

    @property
    def result(self) -> Any:
        return self._fetch(block=False)[1]

    @property
    def traceback(self) -> str | None:
        state, value = self._fetch(block=False)
        return str(value) if state == "FAILURE" else None

    def get(self, timeout: float | None = None, propagate: bool = True, interval: float = 0.5) -> Any:
        try:
            state, value = self._fetch(block=True, timeout=timeout if timeout is not None else 3600)
        except ResultTimeout:
            raise TimeoutError(f"the operation timed out: {self.id} not ready after {timeout}s") from None
        if state == "FAILURE" and propagate:
            raise value
        return value

    def revoke(self, terminate: bool = False, signal: str | None = None) -> None:
        """Drop the message if it has not started (plain actors cannot be terminated)."""
        blocking_services().call(lambda s: s.enqueuer.cancel(self.id))


class ActorTask(_CeleryTask):
    """A plain actor with Celery's `.delay()` / `.apply_async()`."""

    def __init__(self, name: str, actor: Callable[[DeclaredActors], dramatiq.Actor[Any, Any]]) -> None:
        self._actor = actor
        self.name = f"tasks.{name}"

    @property
    def actor(self) -> dramatiq.Actor[Any, Any]:
        """The actor, declared on this process's broker when first sent (not at import)."""
        return self._actor(process_worker())

    def apply_async(
        self,
        args: Iterable[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        *,
        priority: int | bool | None = None,
        queue: str | None = None,
        **options: Any,
    ) -> ActorResult:
        level = {} if queue is None and priority is None else {LEVEL_OPTION: level_for(queue, priority)}
        message = self.actor.send_with_options(args=tuple(args or ()), kwargs=dict(kwargs or {}), **level)
        return ActorResult(message)


# -- the module-level helpers of the Celery service ------------------------------------------


def AsyncResult(task_id: str) -> EvaluationResult:
    """Rebuild an evaluation's handle from its task id (`celery-{eval_id}`), in any process."""
    return EvaluationResult(task_id)


def cancel_celery_task(eval_id: str, terminate: bool = False) -> dict[str, Any]:
    """The contract's cancel answer; errors come back in the answer, never raised."""
    task_id = task_id_of(eval_id)
    try:
        outcome = blocking_services().call(lambda s: s.canceller.cancel(eval_id, terminate))
    except Exception as exc:  # the contract: an error is an answer
        return {"eval_id": eval_id, "task_id": task_id, "cancelled": False, "error": str(exc),
                "message": "Failed to cancel task"}  # fmt: skip
    if outcome is None:
        return {"eval_id": eval_id, "task_id": task_id, "cancelled": False, "error": "Evaluation not found",
                "message": "Failed to cancel task"}  # fmt: skip
    return outcome.to_dict()


def get_celery_task_info(eval_id: str) -> dict[str, Any]:
    """`{eval_id, task_id, state, ready, successful?, failed?, result | error+traceback}`."""
    handle = EvaluationResult(task_id_of(eval_id))
    record = handle._record()
    state = celery_state(record) if record else "PENDING"
    info: dict[str, Any] = {"eval_id": eval_id, "task_id": handle.id, "state": state}
    info["ready"] = state in READY_STATES
    if not info["ready"]:
        return info
    info["successful"] = state == "SUCCESS"
    info["failed"] = state == "FAILURE"
    outcome = _outcome(record) if record else None
    if isinstance(outcome, Exception):
        info["error"] = str(outcome)
        info["traceback"] = handle.traceback
    else:
        info["result"] = outcome
    return info


class DeadLetterQueue:
    """The Celery service's synchronous DLQ class, over the same `AsyncDeadLetterQueue` the API uses."""

    def __init__(self, redis_url: str | None = None, namespace: str | None = None) -> None:
        self._services = blocking_services(redis_url, namespace)

    def add_task(self, entry: dict[str, Any]) -> str:
        return self._services.call(lambda s: s.dlq.add_task(entry))

    def get_task(self, task_id: str) -> dict[str, Any] | None:
        return self._services.call(lambda s: s.dlq.get_task(task_id))

    def list_tasks(self, limit: int = 100, offset: int = 0, eval_id: str | None = None) -> list[dict]:
        return self._services.call(lambda s: s.dlq.list_tasks(limit, offset, eval_id))

    def get_all_tasks(self) -> list[dict[str, Any]]:
        return self._services.call(lambda s: s.dlq.get_all_tasks())

    def get_queue_size(self) -> int:
        return self._services.call(lambda s: s.dlq.get_queue_size())

    def remove_task(self, task_id: str) -> bool:
        return self._services.call(lambda s: s.dlq.remove_task(task_id))

    def retry_task(self, task_id: str) -> bool:
        return self._services.call(lambda s: s.dlq.retry_task(task_id))

    def clear_old_tasks(self, days: float = 30) -> int:
        return self._services.call(lambda s: s.dlq.clear_old_tasks(days))

    def get_statistics(self) -> dict[str, Any]:
        return self._services.call(lambda s: s.dlq.get_statistics())


evaluate_code = EvaluateTask()
health_check = ActorTask("health_check", lambda worker: worker.health_check)
cleanup_old_evaluations = ActorTask("cleanup_old_evaluations", lambda worker: worker.cleanup_old_evaluations)
monitor_dead_letter_queue = ActorTask(
    "monitor_dead_letter_queue", lambda worker: worker.monitor_dead_letter_queue
)
