"""The Celery service's synchronous `DeadLetterQueue` class, on a real Redis."""

from __future__ import annotations

import time

import redis

from app.celery.shim import DeadLetterQueue


def entry(task_id: str, exception_class: str, task_name: str = "evaluate_code") -> dict:
    return {"task_id": task_id, "task_name": task_name, "exception_class": exception_class, "eval_id": None}


def test_the_contracts_methods(redis_url: str, namespace: str) -> None:
    dlq = DeadLetterQueue(redis_url=redis_url, namespace=namespace)
    assert dlq.get_queue_size() == 0 and dlq.get_all_tasks() == []
    dlq.add_task(entry("t1", "ExecutorUnavailable"))
    dlq.add_task(entry("t2", "ExecutorHTTPError"))
    dlq.add_task(entry("t3", "ExecutorUnavailable", task_name="cleanup_old_evaluations"))
    assert dlq.get_queue_size() == 3
    assert dlq.get_task("t2")["exception_class"] == "ExecutorHTTPError"
    assert dlq.get_task("nope") is None
    assert [e["task_id"] for e in dlq.list_tasks(limit=2)] == ["t3", "t2"]
    assert [e["task_id"] for e in dlq.list_tasks(limit=2, offset=2)] == ["t1"]
    stats = dlq.get_statistics()
    assert stats["queue_size"] == 3
    assert stats["exception_breakdown"] == {"ExecutorUnavailable": 2, "ExecutorHTTPError": 1}
    assert stats["task_breakdown"] == {"evaluate_code": 2, "cleanup_old_evaluations": 1}
    assert dlq.remove_task("t2") is True and dlq.remove_task("t2") is False

    # t1 failed 40 days ago: only it is cleared
    redis.Redis.from_url(redis_url).zadd(f"{namespace}:dlq", {"t1": (time.time() - 40 * 86400) * 1000})
    assert dlq.clear_old_tasks(days=30) == 1
    assert [e["task_id"] for e in dlq.get_all_tasks()] == ["t3"]
