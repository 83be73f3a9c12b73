"""Celery's task messages as kombu's Redis transport stores them, read without Celery.

A producer's `send_task(name, args, queue=Q, task_id=T)` LPUSHes one JSON envelope onto the
list named Q (or `Q\\x06\\x16<n>` for a message priority n in kombu's priority steps):
`{"body": <base64>, "content-type": "application/json", "headers": {"task", "id", ...},
"properties": {"priority", "body_encoding": "base64", "delivery_info", ...}}`. Protocol 2 keeps
the task in the headers and `[args, kwargs, embed]` in the body; protocol 1 keeps everything in
the body. Consumers take from the list's right end: the oldest first.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from evaluations.submission_spec import RUN_FIELDS

#: The names the platform's producers sent the evaluation task under.
TASK_NAMES = frozenset({"tasks.evaluate_code", "celery_worker.tasks.evaluate_code"})
#: The Celery deployment's queues, highest level first (`CELERY_WIRE_QUEUES` changes them).
LEGACY_QUEUES = ("high_priority", "evaluation", "default", "celery", "batch")
#: kombu's Redis transport: a queue's list for message priority n (its steps), lowest n first.
PRIORITY_SEPARATOR = "\x06\x16"
PRIORITY_STEPS = (0, 3, 6, 9)
#: Positional arguments, in the order the producers' versions sent them: the first three from
#: the start, then the later ones' limits (a CPU limit is accepted and not used: a run gets one
#: core at most).
POSITIONAL = ("eval_id", "code", "language", "timeout", "memory_limit", "cpu_limit")
#: Keyword arguments taken as the API takes them.
KEYWORDS = frozenset({*POSITIONAL, "priority", *RUN_FIELDS})
MEMORY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(k|ki|m|mi|g|gi|kb|mb|gb)?\s*$", re.IGNORECASE)
MB_PER_UNIT = {"k": 1 / 1024, "ki": 1 / 1024, "kb": 1 / 1024, "m": 1, "mi": 1, "mb": 1, "g": 1024, "gi": 1024,
               "gb": 1024, None: 1}  # fmt: skip


class BadMessage(ValueError):
    """A message that is not a Celery task Crucible serves; the reason says why."""


@dataclass(frozen=True)
class CeleryTask:
    name: str
    task_id: str
    args: list[Any]
    kwargs: dict[str, Any]
    queue: str
    priority: int | None = None


#: Where `app.control.revoke(...)` and other broadcasts go with kombu's Redis transport: a
#: PUBLISH on the fanout exchange's channel, `/<db>.celery.pidbox` (with `/<routing key>` after).
PIDBOX_CHANNELS = "/{db}.celery.pidbox*"


def queue_lists(queue: str) -> list[str]:
    """The lists kombu keeps `queue` in, in the order a consumer takes them."""
    return [queue, *(f"{queue}{PRIORITY_SEPARATOR}{n}" for n in PRIORITY_STEPS[1:])]


def decode(raw: str | bytes, queue: str) -> CeleryTask:
    """The task in one stored message; `BadMessage` if it is not one."""
    try:
        envelope = json.loads(raw)
        properties = envelope.get("properties") or {}
        headers = envelope.get("headers") or {}
        body: Any = envelope["body"]
        if properties.get("body_encoding") == "base64":
            body = base64.b64decode(body)
        if envelope.get("content-type", "application/json") != "application/json":
            raise BadMessage(f"content type {envelope.get('content-type')!r}: only JSON is read")
        payload = json.loads(body)
        if "task" in headers:  # protocol 2
            args, kwargs = payload[0], payload[1]
            name, task_id = headers["task"], headers["id"]
        else:  # protocol 1
            args, kwargs = payload.get("args", []), payload.get("kwargs", {})
            name, task_id = payload["task"], payload["id"]
    except BadMessage:
        raise
    except (ValueError, LookupError, TypeError, AttributeError, binascii.Error, RecursionError) as exc:
        raise BadMessage(f"not a Celery task message: {type(exc).__name__}: {str(exc)[:200]}") from None
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise BadMessage("a task's args must be a list and its kwargs an object")
    priority = properties.get("priority")
    priority = priority if isinstance(priority, int) else None
    return CeleryTask(str(name), str(task_id), args, kwargs, queue, priority)


#: kombu's Redis transport: the set of a direct exchange's bindings, each
#: "<routing key>\x06\x16<pattern>\x06\x16<queue>".
BINDINGS_PREFIX = "_kombu.binding."


@dataclass(frozen=True)
class ControlCommand:
    method: str
    arguments: dict[str, Any]
    #: where a reply goes: (exchange, routing key), and the ticket it carries; None: no reply
    reply_to: tuple[str, str] | None = None
    ticket: str | None = None


def decode_control(raw: str | bytes) -> ControlCommand:
    """A broadcast control command; `BadMessage` if it is not one."""
    try:
        envelope = json.loads(raw)
        body: Any = envelope["body"]
        if (envelope.get("properties") or {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        command = json.loads(body)
        reply = command.get("reply_to")
        reply_to = (str(reply["exchange"]), str(reply["routing_key"])) if isinstance(reply, dict) else None
        return ControlCommand(str(command["method"]), dict(command.get("arguments") or {}), reply_to,
                              command.get("ticket"))  # fmt: skip
    except (ValueError, KeyError, TypeError, AttributeError, binascii.Error) as exc:
        raise BadMessage(f"not a Celery control message: {exc!r}") from None


def encode_reply(body: dict[str, Any], exchange: str, routing_key: str, ticket: str | None) -> str:
    """A control reply as kombu's Redis transport stores one in the reply queue."""
    return json.dumps({
        "body": base64.b64encode(json.dumps(body).encode()).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {"ticket": ticket} if ticket else {},
        "properties": {
            "delivery_mode": 1,
            "delivery_info": {"exchange": exchange, "routing_key": routing_key},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    })  # fmt: skip


def submission_body(task: CeleryTask) -> dict[str, Any]:
    """The API body the task's arguments stand for (validated then as the API validates one)."""
    if task.name not in TASK_NAMES:
        raise BadMessage(f"unknown task {task.name!r}; Crucible serves {sorted(TASK_NAMES)}")
    if len(task.args) > len(POSITIONAL):
        raise BadMessage(f"{len(task.args)} positional arguments; at most {len(POSITIONAL)}: {POSITIONAL}")
    unknown = set(task.kwargs) - KEYWORDS
    if unknown:
        raise BadMessage(f"unknown keyword arguments {sorted(unknown)}")
    given = {**dict(zip(POSITIONAL, task.args, strict=False)), **task.kwargs}
    if "eval_id" not in given:  # one the task id fixes, so a message taken twice is one evaluation
        given["eval_id"] = task.task_id.removeprefix("celery-")
    given.pop("cpu_limit", None)
    memory = given.pop("memory_limit", None)
    if memory is not None and "memory_mb" not in given:
        given["memory_mb"] = memory_mb(memory)
    return {k: v for k, v in given.items() if v is not None}


def memory_mb(value: Any) -> Any:
    """A memory limit as sent (megabytes, or "512m", "1Gi"...) in whole megabytes; anything else
    is passed on for the API's own check to refuse."""
    if isinstance(value, str) and (found := MEMORY.match(value)):
        try:
            return int(float(found.group(1)) * MB_PER_UNIT[(found.group(2) or "").lower() or None])
        except (OverflowError, ValueError):
            raise BadMessage(f"memory limit {value[:40]!r} is out of range") from None
    return value
