"""Webhooks: each finished evaluation with a `callback_url` gets its result POSTed there, signed
(evaluations/webhooks.py), at least once.

When an evaluation finishes, status.lua files it as due (`callbacks_due`), in the same atomic
call as the final status: nothing finishes without its webhook being due. In each worker
process a relay (`CallbackRelay`) takes what is due, enqueues one `deliver_callback` message
for it, once however often it is taken (`enqueue_once` on its delivery id), and only then drops
it; one taken by a relay that died comes due again after a lease. The actor POSTs the same JSON
as `GET /api/eval/{id}` shows its owner, under the `network_error` retry policy; after the last
retry the message is dead-lettered (retry it from the DLQ like any entry). The record shows
the delivery's state under `callback` (evaluations/views.py), and `$ns:stats` counts outcomes
(`callback:<outcome>`, /metrics).

The URL's host is checked when it is given and again as it is connected to (infra/outbound.py):
a host that resolves to an address Crucible must not reach is `refused`, recorded, not retried.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import dramatiq
import httpx
import structlog
from dramatiq import Middleware
from dramatiq.errors import ActorNotFound
from dramatiq.middleware import CurrentMessage

from evaluations import json_codec
from evaluations.api_keys import KeyStore
from evaluations.queue import ONCE_OPTION
from evaluations.redis_keys import RedisKeys
from evaluations.store import EvaluationStore, utc_now
from evaluations.views import for_caller, public_view
from evaluations.webhooks import (
    DELIVERY_HEADER,
    EVENT,
    EVENT_HEADER,
    SIGNATURE_HEADER,
    delivery_id,
    signature,
)
from infra.outbound import BlockedAddress
from middleware.state import RETRIES

if TYPE_CHECKING:
    from actors.runtime import WorkerRuntime

log = structlog.get_logger(__name__)

CALLBACK_ACTOR = "deliver_callback"
#: The retry policy deliveries are retried under.
POLICY = "network_error"
USER_AGENT = "Crucible-Webhooks/1"
#: How long a relay holds what it took before another may take it (it died meanwhile).
LEASE_MS = 30_000
#: How long a delivery waits when its key has as many in flight as it may (and up to as long again).
DEFER_MS = 1000
#: How many due webhooks a relay takes at once, and how long it waits for the bell.
TAKE = 50
BELL_WAIT_S = 1

# KEYS: the due zset. ARGV: lease (ms), how many. What is due now, each pushed a lease later.
CLAIM_LUA = """
local time = redis.call("TIME")
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local items = redis.call("zrangebyscore", KEYS[1], "-inf", now, "LIMIT", 0, tonumber(ARGV[2]))
for _, item in ipairs(items) do
    redis.call("zadd", KEYS[1], now + tonumber(ARGV[1]), item)
end
return items
"""


class DeliveryFailed(Exception):
    """The receiver did not take the webhook (no answer, or not a 2xx): retried."""


async def deliver_callback(rt: WorkerRuntime, eval_id: str, final_at_ms: int) -> str:
    """POST `eval_id`'s result to its `callback_url`; the delivery's outcome."""
    resources = rt.resources()
    store, client = resources.store, resources.redis
    bound = log.bind(eval_id=eval_id)
    record = await store.get(eval_id)
    if record is None or not record.get("callback_url"):
        bound.info("callback.gone")
        return "gone"
    if str(record.get("callback_due_at") or "") != str(final_at_ms):
        bound.info("callback.superseded", final_at_ms=final_at_ms)  # it finished again since
        return "superseded"
    keys = KeyStore(client, store.ns)
    owner = record.get("owner") or ""
    # as a key that is not an admin's sees it, whoever sent it: it leaves for another host
    view = for_caller(public_view(record), None)
    view.pop("callback", None)
    body = json_codec.dumps(view).encode()
    headers = {
        **json.loads(record.get("callback_headers") or "{}"),
        "content-type": "application/json",
        "user-agent": USER_AGENT,
        SIGNATURE_HEADER: signature(await keys.webhook_secret(owner), body),
        DELIVERY_HEADER: delivery_id(eval_id, final_at_ms),
        EVENT_HEADER: EVENT,
    }
    # a key's deliveries hold at most `webhook_max_in_flight` worker slots at once: receivers
    # that never answer cannot take every tenant's slots (the rest wait, no attempt counted)
    in_flight = store.keys.callbacks_in_flight(owner)
    timeout = rt.settings.webhook_timeout_s
    async with client.pipeline(transaction=True) as pipe:
        pipe.incr(in_flight)
        pipe.expire(in_flight, int(timeout) + 60)
        held, _ = await pipe.execute()
    try:
        if int(held) > rt.settings.webhook_max_in_flight:
            await _later(eval_id, final_at_ms)
            bound.info("callback.deferred", in_flight=int(held) - 1)
            return "deferred"
        return await _attempt(rt, eval_id, record, body, headers)
    finally:
        await client.decr(in_flight)


async def _attempt(
    rt: WorkerRuntime, eval_id: str, record: dict[str, Any], body: bytes, headers: dict[str, str]
) -> str:
    """One POST of the webhook and what it came to; DeliveryFailed when it is to be retried."""
    resources = rt.resources()
    store, client = resources.store, resources.redis
    bound = log.bind(eval_id=eval_id)
    await client.hincrby(store.keys.record(eval_id), "callback_attempts", 1)
    timeout = rt.settings.webhook_timeout_s
    try:
        status = await asyncio.wait_for(
            _post(resources.webhooks, record["callback_url"], body, headers), timeout
        )
        if 200 <= status < 300:
            await _outcome(client, store, eval_id, "delivered", "", delivered=True)
            bound.info("callback.delivered", status=status)
            return "delivered"
        error = f"HTTP {status}" + (" (redirects are not followed)" if 300 <= status < 400 else "")
    except BlockedAddress as exc:
        await _outcome(client, store, eval_id, "refused", str(exc))
        bound.warning("callback.refused", error=str(exc), detail=exc.detail)
        return "refused"
    except TimeoutError:
        error = f"no answer within {timeout:g} s"
    except httpx.HTTPError as exc:
        error = f"{type(exc).__name__}: {exc}"[:500]
    except Exception as exc:  # anything else the sender raised: a failure like the others
        error = f"{type(exc).__name__}: {exc}"[:500]
    message = CurrentMessage.get_current_message()
    retries = int(message.options.get(RETRIES, 0)) if message else 0
    last = retries >= int(rt.settings.retry_policies[POLICY]["max_retries"])
    await _outcome(client, store, eval_id, "failed" if last else "retrying", error)
    bound.warning("callback.failed", error=error, retries=retries, last=last)
    raise DeliveryFailed(error)


async def _later(eval_id: str, final_at_ms: int) -> None:
    """Send this delivery again in a moment, with the retries it has had."""
    current = CurrentMessage.get_current_message()
    broker = dramatiq.get_broker()
    message = broker.get_actor(CALLBACK_ACTOR).message_with_options(
        args=(eval_id, final_at_ms), **{RETRIES: int(current.options.get(RETRIES, 0)) if current else 0}
    )
    await asyncio.to_thread(broker.enqueue, message, delay=DEFER_MS + random.randrange(DEFER_MS))


async def _post(client: httpx.AsyncClient, url: str, body: bytes, headers: dict[str, str]) -> int:
    """The receiver's status; its body is never read (it may be endless)."""
    async with client.stream("POST", url, content=body, headers=headers) as response:
        return response.status_code


async def _outcome(
    client: Any, store: EvaluationStore, eval_id: str, status: str, error: str, *, delivered: bool = False
) -> None:
    fields = {"callback_status": status, "callback_last_error": error}
    if delivered:
        fields["callback_delivered_at"] = utc_now()
    async with client.pipeline(transaction=True) as pipe:
        pipe.hset(store.keys.record(eval_id), mapping=fields)
        pipe.hincrby(store.keys.stats, f"callback:{status}", 1)
        await pipe.execute()


class CallbackRelay(Middleware):
    """In each worker process, a thread that turns due webhooks into delivery messages."""

    def __init__(self, connect: Callable[[], Any], namespace: str) -> None:
        """`connect()` makes the thread's Redis client (`sync_client_for(settings)`)."""
        self.connect = connect
        self.keys = RedisKeys(namespace)
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None

    def after_worker_boot(self, broker: Any, worker: Any) -> None:
        self.stopping.clear()
        self.thread = threading.Thread(target=self._run, args=(broker,), name="callback-relay", daemon=True)
        self.thread.start()

    def before_worker_shutdown(self, broker: Any, worker: Any) -> None:
        self.stopping.set()

    def _run(self, broker: Any) -> None:
        try:
            actor = broker.get_actor(CALLBACK_ACTOR)
        except ActorNotFound:  # a broker built without our actors (a test's): nothing to relay
            log.info("callback.relay_idle", reason=f"no {CALLBACK_ACTOR} actor declared")
            return
        client = self.connect()
        claim = client.register_script(CLAIM_LUA)
        while not self.stopping.is_set():
            try:
                taken = [
                    item.decode() for item in claim(keys=[self.keys.callbacks_due], args=[LEASE_MS, TAKE])
                ]
                for item in taken:
                    eval_id, at = item.rsplit(" ", 1)
                    message = actor.message(eval_id, int(at))
                    message.options[ONCE_OPTION] = f"callback:{delivery_id(eval_id, int(at))}"
                    broker.enqueue(message)
                    client.zrem(self.keys.callbacks_due, item)
                if not taken:
                    client.blpop([self.keys.callbacks_bell], timeout=BELL_WAIT_S)
            except Exception as exc:  # Redis away: what was due stays due
                log.warning("callback.relay_paused", error=f"{type(exc).__name__}: {exc}")
                self.stopping.wait(1)
        client.close()
