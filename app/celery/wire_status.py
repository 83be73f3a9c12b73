"""What `/health` and the dashboard say of the Celery wire (app/celery/ingress.py)."""

from __future__ import annotations

import time
from typing import Any

from app.celery.results import results_status
from evaluations.celery_wire import queue_lists
from evaluations.redis_keys import RedisKeys

#: How long a rejected message keeps `/health` degraded.
REJECTED_RECENTLY_S = 600
#: How long a failed write of Celery result records keeps `/health` degraded, while some wait.
RESULTS_FAILED_RECENTLY_S = 30


async def wire_status(client: Any, keys: RedisKeys, queues: tuple[str, ...]) -> dict[str, Any]:
    """What `/health` and the dashboard say of the Celery wire: messages waiting in the legacy
    queues, whether an ingress runs, what it rejected, where it writes results and how many wait
    to be written; `problem` names what is wrong, if anything."""
    async with client.pipeline(transaction=False) as pipe:
        for queue in queues:
            for queue_list in queue_lists(queue):
                pipe.llen(queue_list)
        pipe.exists(keys.celery_wire_alive)
        pipe.hgetall(keys.celery_wire_counts)
        *lengths, alive, counts = await pipe.execute()
    waiting: dict[str, int] = {}
    lists = [(queue, queue_list) for queue in queues for queue_list in queue_lists(queue)]
    for (queue, _), length in zip(lists, lengths, strict=True):
        if length:
            waiting[queue] = waiting.get(queue, 0) + int(length)
    rejected_at = float(counts.get("last_rejected_at") or 0)
    results = await results_status(client, keys, counts)
    problem = None
    if waiting and not alive:
        problem = f"Celery messages waiting with no ingress consuming them: {waiting}"
    elif unwritten := _unwritten(results, alive):
        problem = unwritten
    elif rejected_at and time.time() - rejected_at < REJECTED_RECENTLY_S:
        problem = (f"a Celery message was dead-lettered: task {counts.get('last_rejected_task')!r}: "
                   f"{counts.get('last_rejected_reason')}")  # fmt: skip
    return {
        "ingress": "running" if alive else "absent",
        "waiting": waiting,
        "accepted": int(counts.get("accepted") or 0),
        "rejected": int(counts.get("rejected") or 0),
        "results": results,
        "problem": problem,
    }


def _unwritten(results: list[dict[str, Any]], alive: bool) -> str | None:
    """What is wrong with Celery result records waiting to be written elsewhere, if anything."""
    waiting = [r for r in results if r["pending"]]
    now = time.time()
    failing = [r for r in waiting if now - (r["last_error_at"] or 0) < RESULTS_FAILED_RECENTLY_S]
    if waiting and not alive:
        return f"Celery result records wait for an ingress to write them: {_pending(waiting)}"
    if failing:
        return f"Celery result records not yet written: {_pending(failing)}: {failing[0]['last_error']}"
    return None


def _pending(results: list[dict[str, Any]]) -> str:
    return ", ".join(f"{r['pending']} for {r['backend']}" for r in results)
