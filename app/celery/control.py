"""Celery's remote control, as unchanged producers use it: `app.control.revoke(task_id)` and
`revoke(task_id, terminate=True)` are broadcast on the `celery.pidbox` fanout channel; Crucible
cancels the evaluation exactly as `POST /api/eval/{id}/cancel` does (a queued one never runs; a
running one is killed only with `terminate`, as a Celery worker does); `celery inspect ping`
gets an answer from each Crucible worker online. Other commands are logged and left alone.
Run inside `crucible celery-ingress`.
"""

from __future__ import annotations

import asyncio

import structlog
from redis.asyncio.client import PubSub

from app.services import Services
from app.system_status import SystemStatus
from evaluations.celery_wire import (
    BINDINGS_PREFIX,
    PIDBOX_CHANNELS,
    PRIORITY_SEPARATOR,
    BadMessage,
    ControlCommand,
    decode_control,
    encode_reply,
)
from evaluations.queue import eval_id_of_task

log = structlog.get_logger(__name__)

#: How long a revoke of a task not taken yet is remembered (Celery workers keep theirs a while).
REVOKE_MEMORY_S = 3600


async def subscribe(services: Services) -> PubSub:
    """Listen to the broadcasts sent on our Redis database's `celery.pidbox` (channels are
    server-wide; their names carry the database)."""
    pubsub = services.client.pubsub()
    database = services.client.connection_pool.connection_kwargs.get("db", 0)
    await pubsub.psubscribe(PIDBOX_CHANNELS.format(db=database))
    return pubsub


async def listen(services: Services, pubsub: PubSub, stop: asyncio.Event) -> None:
    """Carry out the broadcasts until `stop` is set."""
    try:
        while not stop.is_set():
            try:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5)
                if message is not None and message["type"] == "pmessage":
                    await carry_out(services, message["data"])
            except Exception as exc:  # one bad command, or Redis away a moment: keep listening
                log.warning("celery_control.failed", error=str(exc))
                await asyncio.sleep(0.5)
    finally:
        await pubsub.aclose()


async def carry_out(services: Services, raw: str | bytes) -> None:
    try:
        command = decode_control(raw)
    except BadMessage as exc:
        log.warning("celery_control.unreadable", reason=str(exc))
        return
    if command.method == "revoke":
        await revoke(services, command.arguments)
    elif command.method == "ping" and command.reply_to:
        await pong(services, command)
    else:
        log.info("celery_control.ignored", method=command.method)


async def pong(services: Services, command: ControlCommand) -> None:
    """`celery inspect ping`: each Crucible worker process online answers, by its name."""
    assert command.reply_to is not None
    exchange, routing_key = command.reply_to
    workers = await SystemStatus(services.client, services.settings, services.http).workers()
    names = [w["name"] for w in workers if w["online"]]
    bindings = await services.client.smembers(BINDINGS_PREFIX + exchange)
    queues = [
        b.split(PRIORITY_SEPARATOR)[2] for b in bindings if b.split(PRIORITY_SEPARATOR)[0] == routing_key
    ]
    for queue in queues:
        for name in names:
            await services.client.lpush(queue, encode_reply({name: {"ok": "pong"}}, exchange, routing_key,
                                                            command.ticket))  # fmt: skip
    log.info("celery_control.ping", workers=len(names), queues=len(queues))


async def revoke(services: Services, arguments: dict[str, object]) -> None:
    task_ids = arguments.get("task_id") or []
    terminate = bool(arguments.get("terminate", False))
    keys = services.store.keys
    for task_id in [str(t) for t in ([task_ids] if isinstance(task_ids, str | int) else list(task_ids))]:
        eval_id = await services.client.get(keys.celery_wire_task(task_id)) or eval_id_of_task(task_id)
        outcome = await services.canceller.cancel(eval_id, terminate)
        if outcome is None:  # not taken yet: it is cancelled as soon as it is
            mode = "terminate" if terminate else ""
            await services.client.set(keys.celery_wire_revoked(task_id), mode, ex=REVOKE_MEMORY_S)
        done = bool(outcome and outcome.cancelled)
        log.info("celery_control.revoke", task_id=task_id, terminate=terminate, done=done,
                 outcome=outcome and outcome.message)  # fmt: skip
