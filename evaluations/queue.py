"""The queue protocol every process that speaks to our queues shares: the one Dramatiq queue,
its three strict-priority levels and the names callers of the Celery deployment used for them,
the evaluation message's shape, and how messages are encoded.

No broker is built here: the API and the Celery shim enqueue with these, workers consume them
(`actors.worker.build_worker` builds the broker and declares the actors).
"""

from __future__ import annotations

from typing import Any

from dramatiq.errors import DecodeError
from dramatiq.message import Message

from evaluations.json_codec import MessageEncoder
from evaluations.submission_spec import RunSpec

#: The one Dramatiq queue name every actor uses; levels are a message option.
QUEUE_NAME = "crucible"

#: Queue levels in strict priority order: a worker drains high before default before low.
LEVELS: tuple[str, ...] = ("high", "default", "low")

#: Names callers of the Celery deployment used for the same three levels.
LEVEL_ALIASES: dict[str, str] = {
    "high": "high",
    "high_priority": "high",
    "default": "default",
    "evaluation": "default",
    "low": "low",
    "batch": "low",
    "maintenance": "low",
}

#: Numeric priorities (as Celery's `priority`, and later versions of the platform, send them):
#: at least HIGH_PRIORITY_AT is high, at least DEFAULT_PRIORITY_AT default, anything lower low.
#: Celery's own queues used 10 (high_priority), 5 (evaluation) and 1 (batch).
HIGH_PRIORITY_AT = 8
DEFAULT_PRIORITY_AT = 4


def level_of_priority(priority: int) -> str:
    """The level a numeric priority names."""
    return "high" if priority >= HIGH_PRIORITY_AT else "default" if priority >= DEFAULT_PRIORITY_AT else "low"


#: The message (and actor) option naming a message's level.
LEVEL_OPTION = "queue_level"
#: periodiq's option naming the tick a scheduled message belongs to.
TICK_OPTION = "scheduled_at"
#: A message carrying this option is enqueued once per its value, however often it is sent.
ONCE_OPTION = "enqueue_once"

#: The actor that runs evaluations, and the one that proves a worker is consuming.
EVALUATE_ACTOR = "evaluate_code"
HEALTH_CHECK_ACTOR = "health_check"

#: A stuck actor is interrupted this long after its run's own time-out; more than the
#: executor client waits beyond it (compile step and answer margin), so it never cuts a run short.
TIME_LIMIT_MARGIN_MS = 60_000

#: Prefix of an evaluation's task id (the Celery deployment's; callers and the DLQ know it).
TASK_ID_PREFIX = "celery-"

#: How every message is written and read (compact JSON through orjson).
ENCODER = MessageEncoder()


def actor_time_limit_ms(wall_s: float) -> int:
    """When Dramatiq interrupts the actor running an evaluation that may take `wall_s` seconds
    at its limits (`RunSpec.total_wall`): after that and the margin."""
    return int(wall_s * 1000) + TIME_LIMIT_MARGIN_MS


def task_id_of(eval_id: str) -> str:
    """The Celery-compatible task id of an evaluation (callers and the DLQ know it by this)."""
    return f"{TASK_ID_PREFIX}{eval_id}"


def eval_id_of_task(task_id: str) -> str:
    """The evaluation a task id names (a bare eval id is taken as it is)."""
    return task_id.removeprefix(TASK_ID_PREFIX)


def encode_message(message: Message[Any]) -> bytes:
    return ENCODER.encode(message.asdict())


def decode_message(data: bytes) -> Message[Any]:
    try:
        return Message(**ENCODER.decode(data))
    except Exception as exc:
        raise DecodeError(f"failed to decode message {data!r}", data, exc) from None


def evaluation_message(eval_id: str, run: RunSpec) -> Message[Any]:
    """The message for one evaluation; its id is the Celery-style task id. Optional fields go
    in only when given, so such a message stays readable by workers that predate them."""
    kwargs = {"eval_id": eval_id, **run.fields()}
    return Message(
        queue_name=QUEUE_NAME,
        actor_name=EVALUATE_ACTOR,
        args=(),
        kwargs=kwargs,
        options={"time_limit": actor_time_limit_ms(run.total_wall)},
        message_id=task_id_of(eval_id),
    )
