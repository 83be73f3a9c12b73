"""Dead-lettering: a message that will not be retried becomes a DLQ entry, never silence.

The entry holds what the contract lists (original arguments, the final failure's class,
message and full traceback, retry count, first and last failure times, metadata) plus the
original message, so `DeadLetterQueue.retry_task` can send it again. The broker writes the
entry, removes the message and marks the evaluation `failed` in one Redis transaction.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from dramatiq.middleware import Middleware

from evaluations import json_codec
from evaluations.queue import LEVEL_OPTION, encode_message
from evaluations.status import GIVE_UP, Status
from evaluations.store import StatusChange, utc_now
from middleware.state import (
    DEAD_LETTER,
    EXCEPTION_CLASS,
    EXCEPTION_MESSAGE,
    FIRST_FAILURE,
    LAST_FAILURE,
    RETRIES,
    STATUS_CHANGE,
    TRACEBACK,
    delivery_expectation,
    describe,
    eval_id_of,
    iso,
)

CODE_PREVIEW = 100


def dead_letter_entry(message: Any) -> dict[str, Any]:
    options = message.options
    now = int(time.time() * 1000)
    kwargs = dict(message.kwargs)
    code = kwargs.get("code") or (message.args[1] if len(message.args) > 1 else "")
    return {
        "task_id": message.message_id,
        "task_name": message.actor_name,
        "eval_id": eval_id_of(message),
        "args": list(message.args),
        "kwargs": kwargs,
        "exception_class": options.get(EXCEPTION_CLASS),
        "exception_message": options.get(EXCEPTION_MESSAGE),
        "traceback": options.get(TRACEBACK),
        "retry_count": options.get(RETRIES, 0),
        "first_failure_time": iso(options.get(FIRST_FAILURE, now)),
        "last_failure_time": iso(options.get(LAST_FAILURE, now)),
        "metadata": {
            "code_preview": str(code)[:CODE_PREVIEW],
            "language": kwargs.get("language", "python"),
            "queue": options.get(LEVEL_OPTION),
        },
        "message": encode_message(message).decode(),
    }


class DeadLetters(Middleware):
    """Prepares the DLQ entry and the `failed` status just before the worker rejects a message.

    `on_status_change(eval_id)` is told once the evaluation was marked failed.
    """

    def __init__(self, on_status_change: Callable[[str], None] | None = None) -> None:
        self.on_status_change = on_status_change

    def before_nack(self, broker: Any, message: Any) -> None:
        entry = dead_letter_entry(message)
        message.options[DEAD_LETTER] = json_codec.dumps(entry)
        if entry["eval_id"]:
            # never the program's failure (those are results): ours, or a service's
            fields = {"completed_at": utc_now(), "error": describe(message), "next_retry_at": "",
                      "internal_error": True}  # fmt: skip
            change = StatusChange.by(
                GIVE_UP, entry["eval_id"], Status.FAILED, fields, delivery_expectation(message)
            )
            message.options[STATUS_CHANGE] = asdict(change)

    def after_nack(self, broker: Any, message: Any) -> None:
        eval_id = eval_id_of(message)
        if eval_id and self.on_status_change:
            self.on_status_change(eval_id)
