"""State the middleware keep on a message's options: its failures, and how to settle it."""

from __future__ import annotations

import os
import socket
import time
import traceback
from datetime import UTC, datetime
from typing import Any

#: Option names; they travel with the message through retries.
RETRIES = "retries"
FIRST_FAILURE = "first_failure_ms"
LAST_FAILURE = "last_failure_ms"
EXCEPTION_CLASS = "exception_class"
EXCEPTION_MESSAGE = "exception_message"
TRACEBACK = "traceback"

#: Set just before a nack: the dead-letter entry (JSON) and the evaluation's status change (dict).
DEAD_LETTER = "dead_letter"
STATUS_CHANGE = "status_change"
#: Set after a failed attempt: settle by retrying later or handing back instead of acking
#: ({"command": "retry" | "requeue", "delay_ms": int}). The consumer performs it at ack time,
#: which Dramatiq repeats until Redis answers, so a decision is never lost to an outage.
SETTLE = "settle"
#: Set when a worker found no record for the evaluation (a message sent straight to the actor).
UNRECORDED = "unrecorded"
#: What the fetch that took this delivery did to its evaluation's status (actors/broker.py).
FETCH_MARK = "fetch_mark"
#: Set with an actor's result: [channel, message] pairs the ack publishes in its MULTI, before
#: the status change (a run's last chunks of live output, actors/live_output.py).
PUBLISH = "publish"
#: Options that describe one delivery only; never copied into a re-sent message.
TRANSIENT_OPTIONS = (DEAD_LETTER, STATUS_CHANGE, SETTLE, UNRECORDED, FETCH_MARK, PUBLISH)
#: The broker's id of one message (the same on each delivery of it; attempt_of tells deliveries apart).
REDIS_ID_OPTION = "redis_message_id"

#: Cleared when a dead-lettered evaluation is retried from the DLQ: counts start again.
FAILURE_OPTIONS = (RETRIES, FIRST_FAILURE, LAST_FAILURE, EXCEPTION_CLASS, EXCEPTION_MESSAGE, TRACEBACK)


def eval_id_of(message: Any) -> str | None:
    """The evaluation a message works on, if it is an evaluation message."""
    if eval_id := message.kwargs.get("eval_id"):
        return str(eval_id)
    if message.actor_name == "evaluate_code" and message.args:
        return str(message.args[0])
    return None


def _fetched_attempt(message: Any) -> str | None:
    """The attempt token ("<Redis message id>#<delivery>") the fetch recorded, if it marked it."""
    mark = message.options.get(FETCH_MARK)
    return str(mark["attempt"]) if mark and mark.get("attempt") else None


def attempt_of(message: Any) -> str:
    """This delivery's token: the one its fetch recorded, else (a message whose fetch did not
    mark it) the Redis message id the broker gave it."""
    return _fetched_attempt(message) or str(message.options.get(REDIS_ID_OPTION, ""))


def delivery_expectation(message: Any) -> dict[str, str]:
    """What a status change made for this delivery requires of the record: its attempt token,
    where its fetch recorded one. A worker taken for dead whose message was fetched again
    meanwhile then changes nothing (its retry, dead letter or hand-back is not the record's)."""
    attempt = _fetched_attempt(message)
    return {"attempt": attempt} if attempt else {}


def worker_name() -> str:
    """How a worker process names itself in records and logs (host:pid, read after fork)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def iso(ms: int | float) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")


def record_failure(message: Any, exception: BaseException) -> None:
    """Note this failure on the message: class, message, full traceback, first and last time."""
    now = int(time.time() * 1000)
    options = message.options
    options.setdefault(FIRST_FAILURE, now)
    options[LAST_FAILURE] = now
    options[EXCEPTION_CLASS] = type(exception).__name__
    options[EXCEPTION_MESSAGE] = _valid_text(str(exception))
    options[TRACEBACK] = _valid_text("".join(traceback.format_exception(exception)))


def _valid_text(text: str) -> str:
    """A failure's text may hold lone surrogates (a file name the OS gave as bytes): JSON
    encoders and Redis's Lua refuse them, and a failure must always be recordable."""
    return text.encode("utf-8", "replace").decode("utf-8")


def describe(message: Any) -> str:
    """`Class: message` of the last failure, for records and logs."""
    return f"{message.options.get(EXCEPTION_CLASS)}: {message.options.get(EXCEPTION_MESSAGE)}"
