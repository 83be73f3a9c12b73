"""Celery's remote control, as unchanged producers use it: `app.control.revoke(task_id)` and
`revoke(task_id, terminate=True)` are broadcast on the `celery.pidbox` fanout channel; Crucible
cancels the evaluation exactly as `POST /api/eval/{id}/cancel` does (a queued one never runs; a
running one is killed only with `terminate`, as a Celery worker does). Other commands are
logged and left alone. Run inside `crucible celery-ingress`.
"""

from __future__ import annotations

import asyncio

import structlog

from app.services import Services
from evaluations.celery_wire import PIDBOX_CHANNELS, BadMessage, decode_control
from evaluations.queue import eval_id_of_task

log = structlog.get_logger(__name__)


async def listen(services: Services, stop: asyncio.Event) -> None:
    """Carry out the broadcasts until `stop` is set."""
    pubsub = services.client.pubsub()
    await pubsub.psubscribe(PIDBOX_CHANNELS)
    try:
        while not stop.is_set():
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5)
            if message is not None and message["type"] == "pmessage":
                await carry_out(services, message["data"])
    finally:
        await pubsub.aclose()


async def carry_out(services: Services, raw: str | bytes) -> None:
    try:
        method, arguments = decode_control(raw)
    except BadMessage as exc:
        log.warning("celery_control.unreadable", reason=str(exc))
        return
    if method != "revoke":
        log.info("celery_control.ignored", method=method)
        return
    task_ids = arguments.get("task_id") or []
    terminate = bool(arguments.get("terminate", False))
    for task_id in [task_ids] if isinstance(task_ids, str) else list(task_ids):
        outcome = await services.canceller.cancel(eval_id_of_task(str(task_id)), terminate)
        log.info("celery_control.revoke", task_id=task_id, terminate=terminate,
                 done=bool(outcome and outcome.cancelled), outcome=outcome and outcome.message)  # fmt: skip
