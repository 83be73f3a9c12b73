"""Retries with the Celery service's jittered exponential backoff, per failure policy.

This replaces Dramatiq's `Retries` middleware: its formula (random backoff up to
min_backoff · 2^n, 15 s minimum, 20 retries by default) and its single policy differ from the
contract. Here the failure picks the policy (`middleware.retry_policy.policy_for`) and the
delay is the contract's formula. The decision is written on the message; when the worker
settles it, the broker swaps the fetched message for a delayed copy atomically, together with
the evaluation showing `running` with `retries` and `next_retry_at`. A worker shutting down
hands its interrupted messages back to the head of their queue instead.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import structlog
from dramatiq.middleware import Middleware, MiddlewareError, Shutdown

from evaluations.retry_policies import RETRY_POLICIES, Policies
from evaluations.status import HAND_BACK, WAIT_FOR_RETRY, Status
from evaluations.store import StatusChange
from middleware.retry_policy import calculate_retry_delay, get_retry_message, policy_for
from middleware.state import (
    RETRIES,
    SETTLE,
    STATUS_CHANGE,
    delivery_expectation,
    describe,
    eval_id_of,
    iso,
    record_failure,
)

log = structlog.get_logger(__name__)


class UnknownPolicy(MiddlewareError, ValueError):
    """An actor names a retry policy that does not exist (raised at declaration)."""


class Backoff(Middleware):
    """After a failed attempt: retry later under the failure's policy, or mark the message failed.

    Actor options: `retry_policy` forces a policy for every retryable failure of that actor;
    `max_retries` overrides the policy's count. `on_status_change(eval_id)` is told after an
    evaluation's status changed here (the worker forwards it to the storage service).
    """

    def __init__(
        self, on_status_change: Callable[[str], None] | None = None, policies: Policies = RETRY_POLICIES
    ) -> None:
        self.on_status_change = on_status_change
        #: the process's table (`Settings.retry_policies`), overrides merged in
        self.policies = policies

    @property
    def actor_options(self) -> set[str]:
        return {"retry_policy", "max_retries"}

    def after_ack(self, broker: Any, message: Any) -> None:
        eval_id = eval_id_of(message)
        if STATUS_CHANGE in message.options and eval_id and self.on_status_change:
            self.on_status_change(eval_id)

    def before_declare_actor(self, broker: Any, actor: Any) -> None:
        policy = actor.options.get("retry_policy")
        if policy is not None and policy not in self.policies:
            raise UnknownPolicy(f"actor {actor.actor_name}: unknown retry_policy {policy!r}")

    def after_process_message(
        self, broker: Any, message: Any, *, result: Any = None, exception: BaseException | None = None
    ) -> None:
        if exception is None:
            return
        try:
            self._plan(broker, message, exception)
        except Exception:
            # never let a failed attempt be acked as done: dead-letter it instead
            log.exception("backoff.failed", task_id=message.message_id)
            message.options.pop(SETTLE, None)
            message.fail()

    def _plan(self, broker: Any, message: Any, exception: BaseException) -> None:
        eval_id = eval_id_of(message)
        if isinstance(exception, Shutdown):
            if eval_id:
                handed_back = StatusChange.by(
                    HAND_BACK, eval_id, Status.QUEUED, {"worker": ""}, delivery_expectation(message)
                )
                message.options[STATUS_CHANGE] = asdict(handed_back)
            message.options[SETTLE] = {"command": "requeue"}
            log.info("message.handing_back", eval_id=eval_id, task_id=message.message_id)
            return

        record_failure(message, exception)
        actor = broker.get_actor(message.actor_name)
        policy = policy_for(exception)
        if policy is not None:
            policy = actor.options.get("retry_policy", policy)
        retries = message.options.get(RETRIES, 0)
        max_retries = actor.options.get("max_retries")
        if max_retries is None:
            max_retries = self.policies[policy]["max_retries"] if policy else 0
        if policy is None or retries >= max_retries:
            log.warning(
                "message.failed", eval_id=eval_id, task_id=message.message_id, retries=retries,
                policy=policy, error=describe(message),
            )  # fmt: skip
            message.fail()
            return

        delay = calculate_retry_delay(retries, policy, policies=self.policies)
        message.options[RETRIES] = retries + 1
        if eval_id:
            fields = {RETRIES: retries + 1, "next_retry_at": iso(time.time() * 1000 + delay * 1000),
                      "error": describe(message)}  # fmt: skip
            message.options[STATUS_CHANGE] = asdict(
                StatusChange.by(
                    WAIT_FOR_RETRY, eval_id, Status.RUNNING, fields, delivery_expectation(message)
                )
            )
        message.options[SETTLE] = {"command": "retry", "delay_ms": int(delay * 1000), "policy": policy}
        log.warning(
            get_retry_message(message.actor_name, eval_id, retries, max_retries, delay, describe(message)),
            eval_id=eval_id, policy=policy,
        )  # fmt: skip
