"""Celery task messages as kombu's Redis transport stores them (evaluations/celery_wire.py)."""

from __future__ import annotations

import base64
import json

import pytest

from evaluations.celery_wire import (
    BadMessage,
    decode,
    decode_control,
    memory_mb,
    queue_lists,
    submission_body,
)


def envelope(body: object, headers: dict | None = None, priority: int | None = None) -> str:
    return json.dumps(
        {
            "body": base64.b64encode(json.dumps(body).encode()).decode(),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": headers or {},
            "properties": {"body_encoding": "base64", "priority": priority, "delivery_info": {}},
        }
    )


def test_protocol_2_keeps_the_task_in_the_headers() -> None:
    raw = envelope(
        [["e1", "print(1)", "python"], {}, {}], {"task": "tasks.evaluate_code", "id": "celery-e1"}, 3
    )
    task = decode(raw, "evaluation")
    assert (task.name, task.task_id, task.args, task.priority) == (
        "tasks.evaluate_code",
        "celery-e1",
        ["e1", "print(1)", "python"],
        3,
    )
    assert submission_body(task) == {"eval_id": "e1", "code": "print(1)", "language": "python"}


def test_protocol_1_keeps_everything_in_the_body() -> None:
    raw = envelope(
        {
            "task": "celery_worker.tasks.evaluate_code",
            "id": "celery-e2",
            "args": ["e2", "print(2)", "python", 5, "1Gi", 0.5],
            "kwargs": {},
        }
    )
    body = submission_body(decode(raw, "batch"))
    assert body == {
        "eval_id": "e2",
        "code": "print(2)",
        "language": "python",
        "timeout": 5,
        "memory_mb": 1024,
    }


OURS = {"task": "tasks.evaluate_code", "id": "x"}


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("not json", "not a Celery task message"),
        (envelope([[], {}, {}], {"task": "tasks.other", "id": "x"}), "unknown task 'tasks.other'"),
        (
            envelope([list(range(7)), {}, {}], {"task": "tasks.evaluate_code", "id": "x"}),
            "positional arguments",
        ),
        (
            envelope([[], {"colour": "red"}, {}], {"task": "tasks.evaluate_code", "id": "x"}),
            "unknown keyword",
        ),
        (envelope(["not", "a", "task"], OURS), "args must be a list"),
    ],
)
def test_what_is_not_a_task_crucible_runs_says_why(raw: str, reason: str) -> None:
    with pytest.raises(BadMessage, match=reason):
        submission_body(decode(raw, "evaluation"))


def test_memory_limits_as_producers_wrote_them() -> None:
    assert [memory_mb(v) for v in (512, "512m", "512Mi", "1g", "2048kb")] == [512, 512, 512, 1024, 2]
    assert memory_mb("lots") == "lots"  # left for the API's own check to refuse


def test_priority_lists_and_control_messages() -> None:
    assert queue_lists("evaluation") == [
        "evaluation",
        "evaluation\x06\x163",
        "evaluation\x06\x166",
        "evaluation\x06\x169",
    ]
    command = decode_control(
        envelope(
            {
                "method": "revoke",
                "arguments": {"task_id": "celery-e1", "terminate": True},
                "reply_to": {"exchange": "reply.celery.pidbox", "routing_key": "k"},
                "ticket": "t",
            }
        )
    )
    assert (command.method, command.arguments["terminate"], command.reply_to, command.ticket) == (
        "revoke",
        True,
        ("reply.celery.pidbox", "k"),
        "t",
    )
