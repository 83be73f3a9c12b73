"""A Dramatiq broker on Redis with strict priority across three levels.

Dramatiq's own RedisBroker gives each queue its own consumer thread and prefetch buffer, so a
worker holding prefetched low messages runs them before a high message that arrives later.
Here there is one Dramatiq queue; its consumer fetches with one atomic Lua call that pops the
oldest high message, else default, else low, and only as many as the worker has free slots.
Nothing is prefetched beyond that, so the next free slot always takes the best message.
The same call marks the evaluation of each message it takes running (see MarkRunning), and a
stopping worker's hand-back marks it queued again.

Idle workers block on a per-level "doorbell" list that every enqueue rings, so a submission
starts in milliseconds without busy polling. Heartbeats go out at least every
`heartbeat_interval_ms` even while every slot is busy; a worker silent for
`heartbeat_timeout_ms` has its unacked messages put back at the head of their level.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import uuid4

import redis
import redis.asyncio as aioredis
import structlog
from dramatiq.broker import Broker, Consumer, MessageProxy
from dramatiq.errors import ConnectionClosed, QueueJoinTimeout
from dramatiq.message import Message
from redis.commands.core import Script

from evaluations import json_codec
from evaluations.errors import Unavailable
from evaluations.queue import (
    LEVEL_OPTION,
    LEVELS,
    ONCE_OPTION,
    QUEUE_NAME,
    TICK_OPTION,
    decode_message,
    encode_message,
)
from evaluations.quotas import QUOTA_FUNCTION_LUA
from evaluations.redis_keys import RedisKeys
from evaluations.store import HISTOGRAM_BOUNDS_MS, STATUS_FUNCTIONS_LUA, TRANSITION_LUA, StatusChange, utc_now
from infra.redis_client import sync_client
from middleware.running import RECORDS_STATUS
from middleware.state import (
    DEAD_LETTER,
    FETCH_MARK,
    PUBLISH,
    REDIS_ID_OPTION,
    SETTLE,
    STATUS_CHANGE,
    TRANSIENT_OPTIONS,
    attempt_of,
    eval_id_of,
    worker_name,
)

log = structlog.get_logger(__name__)

#: How long a sent tick is remembered (longer than any two schedulers' clocks disagree).
TICK_MEMORY_MS = 24 * 3600 * 1000
#: How long a message sent once (`ONCE_OPTION`) is remembered.
ONCE_MEMORY_MS = 24 * 3600 * 1000

#: `submit` counts the submitting key's quota with quota.lua's `admit()`; `fetch` and hand-backs
#: change statuses with status.lua's `transition()`.
DISPATCH_LUA = (
    QUOTA_FUNCTION_LUA + STATUS_FUNCTIONS_LUA + (Path(__file__).parent / "lua" / "dispatch.lua").read_text()
)
BOUNDS_CSV = ",".join(map(str, HISTOGRAM_BOUNDS_MS))
#: Broker operations that also record this worker's heartbeat.
BEATING = ("fetch", "heartbeat")


class NotReplicated(Unavailable):
    """A write Redis took, not yet confirmed by `min_replicas` replicas: a fail-over now would
    lose it."""


def prepare(
    message: Message, level: str, delay_ms: int | None = None, marks: str | None = None
) -> tuple[Message, list[Any]]:
    """Give `message` a fresh Redis id and its level; return it with the `enqueue` arguments.
    `marks`: the evaluation its fetch marks running (an actor that records statuses).

    Shared by the sync broker and the async enqueuer so both write exactly the same thing.
    """
    if level not in LEVELS:
        raise ValueError(f"unknown queue level {level!r}; known: {LEVELS}")
    options = {k: v for k, v in message.options.items() if k not in TRANSIENT_OPTIONS}
    options.update({REDIS_ID_OPTION: str(uuid4()), LEVEL_OPTION: level})
    if isinstance(message, MessageProxy):  # a fetched message being retried
        message = message.copy()
    message = dataclasses.replace(message, queue_name=QUEUE_NAME, options=options)  # options: a new dict
    args = [message.options[REDIS_ID_OPTION], level, message.message_id, delay_ms or 0,
            encode_message(message), marks or ""]  # fmt: skip
    return message, args


def _outcome(reply: list[Any]) -> tuple[bool, str]:
    """transition.lua's answer: whether the change applied, and the status it found."""
    applied, current = reply
    return bool(applied), current.decode() if isinstance(current, bytes) else str(current)


def fetched(reply: list[bytes], stamp: dict[str, str]) -> list[Message]:
    """`fetch`'s answer as messages; each carries its mark (FETCH_MARK) and, if its evaluation
    was marked running, the fields recorded with it (`stamp`), for MarkRunning."""
    messages = []
    for data, mark in zip(reply[::2], reply[1::2], strict=True):
        message = decode_message(data)
        sign, rest = mark[:1], mark[1:].decode()
        if sign == b"+":  # marked running by this delivery, whose attempt token follows
            message.options[FETCH_MARK] = {"applied": True, "attempt": rest, **stamp}
        elif sign == b"=":  # refused: the evaluation's status follows
            message.options[FETCH_MARK] = {"applied": False, "current": rest, **stamp}
        messages.append(message)
    return messages


def tick_key(actor_name: str, scheduled_at: str) -> str:
    """One key per actor and minute (UTC): periodiq's finest schedule is a minute, and a
    scheduler that starts mid-minute sends that minute's tick stamped with its own second."""
    minute = datetime.fromisoformat(scheduled_at).astimezone(UTC).strftime("%Y-%m-%dT%H:%M")
    return f"{actor_name}@{minute}"


def size_report(counts: list[int]) -> dict[str, int]:
    """Name the counts the `sizes` command returns."""
    return dict(zip([*LEVELS, "delayed", "in_flight"], counts, strict=True))


class PriorityBroker(Broker):
    """Dramatiq broker whose consumers honour high → default → low strictly."""

    def __init__(
        self,
        *,
        url: str,
        namespace: str,
        levels: Sequence[str] = LEVELS,
        heartbeat_interval_ms: int = 1000,
        heartbeat_timeout_ms: int = 10000,
        middleware: list[Any] | None = None,
        client: redis.Redis | None = None,
        min_replicas: int = 0,
        wait_ms: int = 500,
    ) -> None:
        """`client`: made from `url` unless given (`sync_client_for`: Sentinels). `min_replicas`:
        a settle with a result waits (WAIT) until that many replicas have it."""
        super().__init__(middleware=middleware)
        self.namespace = namespace
        self.levels = tuple(levels)
        self.heartbeat_interval = heartbeat_interval_ms / 1000
        self.heartbeat_timeout_ms = heartbeat_timeout_ms
        self.broker_id = str(uuid4())
        self.queues: set[str] = set()
        #: worker threads in this process; set at worker boot, caps what a fetch may take
        self.fetch_slots: int | None = None
        #: Redis ids fetched and not yet settled; kept here, not on a consumer, so a consumer
        #: restarted after a connection error still knows every slot is busy
        self.outstanding: set[str] = set()
        #: messages a settle fetched for the slot it freed, not yet handed to a worker thread;
        #: here for the same reason: Dramatiq settles with the consumer the worker thread had,
        #: which may be one closed after a connection error, before its replacement came
        self.fetched: list[Message] = []
        self.slot_freed = threading.Event()
        #: when this worker last told Redis it is alive (every fetch does)
        self.last_beat = 0.0
        #: the worker is shutting down: it takes no more messages (it would only hand them back)
        self.stopping = False
        self.client = client if client is not None else sync_client(url)
        self.min_replicas = min_replicas
        self.wait_ms = wait_ms
        self._dispatch = self.client.register_script(DISPATCH_LUA)
        self._transition = self.client.register_script(TRANSITION_LUA)

    def emit_before(self, signal: str, *args: Any, **kwargs: Any) -> None:
        if signal in ("worker_boot", "worker_shutdown"):
            self.stopping = signal == "worker_shutdown"
        super().emit_before(signal, *args, **kwargs)

    def _dispatch_args(self, command: str, *args: Any) -> list[Any]:
        return [command, self.broker_id, self.heartbeat_timeout_ms, *args]

    def marks(self, message: Message) -> str | None:
        """The evaluation a fetch of `message` marks running: its own, if its actor records statuses."""
        actor = self.actors.get(message.actor_name)
        return eval_id_of(message) if actor and actor.options.get(RECORDS_STATUS) else None

    def fetch_args(self, wanted: int) -> tuple[list[Any], dict[str, str]]:
        """`fetch`'s arguments, and the fields it records on each evaluation it marks running."""
        stamp = {"started_at": utc_now(), "worker": worker_name()}
        return [wanted, stamp["started_at"], stamp["worker"], BOUNDS_CSV, *self.levels], stamp

    def fetch(self, wanted: int) -> list[Message]:
        """Take up to `wanted` messages, highest level first (and mark their evaluations running)."""
        args, stamp = self.fetch_args(wanted)
        return fetched(self.dispatch("fetch", *args), stamp)

    def dispatch(self, command: str, *args: Any) -> Any:
        """Run one broker operation atomically in Redis."""
        try:
            result = self._dispatch(keys=[self.namespace], args=self._dispatch_args(command, *args))
        except redis.ConnectionError as exc:
            raise ConnectionClosed(exc) from None
        if command in BEATING:
            self.last_beat = time.monotonic()
        return result

    def settle(
        self,
        command: str,
        *args: Any,
        status: StatusChange | None = None,
        refill: int = 0,
        publish: Sequence[Sequence[str]] = (),
    ) -> list[Message]:
        """A broker operation and, in the same MULTI, an evaluation's status change, and a
        fetch of up to `refill` messages for the slot this frees.

        So a retry, a dead letter or a hand-back never leaves the queue and the record at odds,
        and a finished run's slot gets its next message, highest level first, in the same round
        trip as its ack. `publish` ((channel, message) pairs: a run's last chunks of live output)
        goes first in that MULTI, so its subscribers get it before the status change.
        Returns the fetched messages.
        """
        if status is None and not refill and not publish:
            self.dispatch(command, *args)
            return []
        # The status change first: a hand-back's own change (running -> queued) then stands, and
        # the one `requeue` makes for a message its fetch marked is refused quietly.
        calls: list[tuple[Script, list[Any]]] = [] if status is None else [(self._transition, status.args())]
        calls.append((self._dispatch, self._dispatch_args(command, *args)))
        stamp: dict[str, str] = {}
        if refill:
            fetch, stamp = self.fetch_args(refill)
            calls.append((self._dispatch, self._dispatch_args("fetch", *fetch)))
        try:
            results = self._multi_by_sha(calls, publish, replicated=status is not None)
        except redis.ConnectionError as exc:
            raise ConnectionClosed(exc) from None
        if refill:
            self.last_beat = time.monotonic()
        if status is not None:
            applied, current = _outcome(results[0])
            if not applied:
                log.info("status.change_refused", eval_id=status.eval_id, wanted=status.status,
                         current=current)  # fmt: skip
        return fetched(results[-1], stamp) if refill else []

    def _multi_by_sha(
        self,
        calls: list[tuple[Script, list[Any]]],
        publish: Sequence[Sequence[str]] = (),
        replicated: bool = False,
    ) -> list[Any]:
        """Run scripts in one MULTI by sha alone (redis-py's pipelined scripts would first ask
        SCRIPT EXISTS: a second round trip on every ack), after publishing `publish`. If Redis
        lost its script cache (a restart, a fail-over), load them and run again just the calls
        that failed for it: each is safe to repeat (a settled message is not settled twice, a
        made change is refused); the scripts' answers are returned. `replicated`: with
        `min_replicas`, wait (WAIT, on the MULTI's own connection) until that many replicas
        have it."""
        with self.client.pipeline(transaction=True) as pipe:
            for channel, published in publish:
                pipe.publish(channel, published)
            for script, args in calls:
                pipe.evalsha(script.sha, 1, self.namespace, *args)
            if replicated and self.min_replicas:
                results = self._multi_then_wait(pipe)[len(publish) :]
            else:
                results = pipe.execute(raise_on_error=False)[len(publish) :]
        lost = [i for i, r in enumerate(results) if isinstance(r, redis.exceptions.NoScriptError)]
        for script in {calls[i][0] for i in lost}:
            script.sha = self.client.script_load(script.script)
        for i in lost:
            script, args = calls[i]
            results[i] = script(keys=[self.namespace], args=args)
        for result in results:
            if isinstance(result, Exception):
                raise result
        return results

    def _multi_then_wait(self, pipe: redis.client.Pipeline) -> list[Any]:
        """`pipe`'s MULTI, then WAIT on the same connection (WAIT counts the replicas that have
        this connection's writes, and cannot run inside MULTI). Too few replicas in time is
        logged, not raised: the result stands on the primary, and settling again would not
        replicate it sooner; a fail-over within that window loses it (the run is then redone
        when its worker is taken for dead, or stays `running`: see docs/scaling.md)."""
        pool = self.client.connection_pool
        conn = pool.get_connection()
        try:
            results = pipe._execute_transaction(conn, pipe.command_stack, False)
            conn.send_command("WAIT", self.min_replicas, self.wait_ms)
            replicas = int(conn.read_response())
        except (redis.ConnectionError, redis.TimeoutError):
            conn.disconnect()
            raise
        finally:
            pool.release(conn)
        if replicas < self.min_replicas:
            log.warning(
                "settle.not_replicated", replicas=replicas, wanted=self.min_replicas, wait_ms=self.wait_ms
            )
        return results

    def transition(self, change: StatusChange) -> tuple[bool, str]:
        """Apply one guarded status change now; whether it applied, and the status it found
        ("" when there is no such record)."""
        return _outcome(self._transition(keys=[self.namespace], args=change.args()))

    def consume(self, queue_name: str, prefetch: int = 1, timeout: int = 30000) -> Consumer:
        slots = min(prefetch, self.fetch_slots) if self.fetch_slots else prefetch
        return PriorityConsumer(self, slots)

    def declare_queue(self, queue_name: str) -> None:
        if queue_name != QUEUE_NAME:
            raise ValueError(f"actors must use queue {QUEUE_NAME!r}; pick a level with {LEVEL_OPTION!r}")
        if queue_name not in self.queues:
            self.emit_before("declare_queue", queue_name)
            self.queues.add(queue_name)
            self.emit_after("declare_queue", queue_name)

    def get_declared_queues(self) -> set[str]:
        return self.queues.copy()

    def get_declared_delay_queues(self) -> set[str]:
        return set()  # delays live in a Redis sorted set; no delay consumer is needed

    def level_of(self, message: Message) -> str:
        level = message.options.get(LEVEL_OPTION)
        if level is None and message.actor_name in self.actors:
            level = self.actors[message.actor_name].options.get(LEVEL_OPTION)
        return level or "default"

    def enqueue(self, message: Message, *, delay: int | None = None) -> Message:
        """Enqueue; a scheduler tick (periodiq's `scheduled_at`) is enqueued once however many
        schedulers send it, since periodiq itself has no guard against two schedulers."""
        message, args = prepare(message, self.level_of(message), delay, self.marks(message))
        self.emit_before("enqueue", message, delay)
        tick = message.options.get(TICK_OPTION)
        once = message.options.get(ONCE_OPTION)
        if once is not None:  # a webhook's delivery (actors/callbacks.py), sent by any relay
            if self.dispatch("enqueue_once", once, ONCE_MEMORY_MS, *args):
                self.emit_after("enqueue", message, delay)
            return message
        if tick is None:
            self.dispatch("enqueue", *args)
            self.emit_after("enqueue", message, delay)
            return message
        try:
            sent = self.dispatch("enqueue_once", tick_key(message.actor_name, tick), TICK_MEMORY_MS, *args)
        except ConnectionClosed as exc:
            # periodiq would die of it; the next tick covers this one (the actors are idempotent)
            log.warning("scheduler.tick_lost", actor=message.actor_name, scheduled_at=tick, error=str(exc))
            return message
        if not sent:
            log.info("scheduler.tick_already_sent", actor=message.actor_name, scheduled_at=tick)
            return message
        self.emit_after("enqueue", message, delay)
        return message

    def queue_sizes(self) -> dict[str, int]:
        """Ready messages per level, delayed messages, and messages in flight."""
        return size_report(self.dispatch("sizes", *LEVELS))

    def wait_for_doorbell(self, timeout: float) -> None:
        """Block until an enqueue on one of our levels rings, or `timeout` passes."""
        bells = [RedisKeys(self.namespace).doorbell(level) for level in self.levels]
        try:
            self.client.blpop(bells, timeout=timeout)
        except redis.ConnectionError as exc:
            raise ConnectionClosed(exc) from None

    def flush(self, queue_name: str) -> None:
        self.flush_all()

    def flush_all(self) -> None:
        keys = list(self.client.scan_iter(match=RedisKeys(self.namespace).everything, count=1000))
        if keys:
            self.client.delete(*keys)

    def join(self, queue_name: str, *, interval: int = 100, timeout: int | None = None) -> None:
        deadline = timeout and time.monotonic() + timeout / 1000
        while any(self.queue_sizes().values()):
            if deadline and time.monotonic() >= deadline:
                raise QueueJoinTimeout(queue_name)
            time.sleep(interval / 1000)

    def close(self) -> None:
        """Leave cleanly: anything still unacked goes back to the head of its level."""
        try:
            self.dispatch("leave")
        except ConnectionClosed:
            pass  # our heartbeat will expire and the messages come back that way
        self.client.close()


class PriorityConsumer(Consumer):
    """Fetches only into free worker slots, highest level first."""

    def __init__(self, broker: PriorityBroker, slots: int) -> None:
        self.broker = broker
        self.slots = slots
        self.cache = broker.fetched
        self.outstanding = broker.outstanding
        self.slot_freed = broker.slot_freed

    def __next__(self) -> MessageProxy | None:
        self.slot_freed.clear()  # before looking: a message a worker thread adds after sets it
        if self.cache:
            return MessageProxy(self.cache.pop(0))
        free = 0 if self.broker.stopping else self.slots - len(self.outstanding)
        if free <= 0:
            # Every slot is busy: wait for one, and keep our heartbeat fresh meanwhile.
            self.slot_freed.wait(self.broker.heartbeat_interval)
            if time.monotonic() - self.broker.last_beat >= self.broker.heartbeat_interval / 2:
                self.broker.dispatch("heartbeat")
            return None
        messages = self.broker.fetch(free)
        if not messages:
            self.broker.wait_for_doorbell(self.broker.heartbeat_interval)
            return None
        for message in messages:
            self._take(message)
        return MessageProxy(self.cache.pop(0))

    def _settle(
        self,
        command: str,
        message: MessageProxy,
        *args: Any,
        status: StatusChange | None,
        publish: Sequence[Sequence[str]] = (),
    ) -> None:
        """Settle from the worker thread that ran it, taking the freed slot's next message in the
        same round trip; the consumer thread hands it on (`__next__`)."""
        redis_id = message.options[REDIS_ID_OPTION]
        refill = 0 if self.broker.stopping else 1
        try:
            # named by its attempt token: a delivery fetched again since settles nothing
            attempt = attempt_of(message)
            settled = self.broker.settle(
                command, attempt, *args, status=status, refill=refill, publish=publish
            )
            for fetched_message in settled:
                self._take(fetched_message)
        finally:
            self.outstanding.discard(redis_id)
            self.slot_freed.set()

    def _take(self, message: Message) -> None:
        self.outstanding.add(message.options[REDIS_ID_OPTION])
        self.cache.append(message)

    def ack(self, message: MessageProxy) -> None:
        """Done with the message: forget it, or do what Backoff decided (retry later, hand back)."""
        change = message.options.get(STATUS_CHANGE)
        status = StatusChange(**change) if change else None
        plan = message.options.get(SETTLE)
        if plan is None:  # the actor's result, if it left one, and what it has to publish
            self._settle("ack", message, status=status, publish=message.options.get(PUBLISH) or ())
        elif plan["command"] == "retry":
            # swap the fetched message for a delayed copy: no moment where it is lost or doubled
            _, args = prepare(
                message, self.broker.level_of(message), plan["delay_ms"], self.broker.marks(message)
            )
            self._settle("retry", message, *args, status=status)
        else:
            self._settle("requeue", message, status=status)

    def nack(self, message: MessageProxy) -> None:
        """Reject: the dead-letter entry and status the DeadLetters middleware prepared commit together."""
        entry = message.options.get(DEAD_LETTER) or json_codec.dumps({"task_id": message.message_id})
        change = message.options.get(STATUS_CHANGE)
        self._settle("nack", message, entry, status=StatusChange(**change) if change else None)

    def requeue(self, messages: Iterable[MessageProxy]) -> None:
        messages = list(messages)
        if messages:
            self.broker.dispatch("requeue", *(attempt_of(m) for m in messages))
            self.outstanding.difference_update(m.options[REDIS_ID_OPTION] for m in messages)
            self.slot_freed.set()


class AsyncEnqueuer:
    """Broker operations from async code (the API, upkeep actors) with the same Lua script,
    never blocking the loop."""

    def __init__(
        self, client: aioredis.Redis, namespace: str, min_replicas: int = 0, wait_ms: int = 500
    ) -> None:
        self.client = client
        self.namespace = namespace
        #: a submission is answered only once this many replicas have it (WAIT; 0: at once)
        self.min_replicas = min_replicas
        self.wait_ms = wait_ms
        self._dispatch = client.register_script(DISPATCH_LUA)

    async def dispatch_in(self, pipe: aioredis.client.Pipeline, command: str, *args: Any) -> None:
        """Add a broker operation to `pipe`, so it commits with the caller's other writes."""
        await self._dispatch(keys=[self.namespace], args=[command, "api", 0, *args], client=pipe)

    def queue_length_in(self, pipe: aioredis.client.Pipeline, level: str) -> None:
        """Add reading how many messages wait on `level` to `pipe`."""
        pipe.llen(RedisKeys(self.namespace).queue(level))

    async def enqueue_in(self, pipe: aioredis.client.Pipeline, message: Message, level: str) -> Message:
        """`message` is an evaluation's (a take-over, a DLQ retry): its fetch marks it running."""
        message, args = prepare(message, level, marks=eval_id_of(message))
        await self.dispatch_in(pipe, "enqueue", *args)
        return message

    async def submit(
        self, record_key: str, creation: list[list[str]], message: Message, level: str, quota: str = ""
    ) -> list[Any]:
        """Count `quota` (RateLimiter.claim, "" for none), write a new record (`creation`, the
        store's commands) and enqueue its message in one atomic call: one round trip, and never
        one without the others. The answer (dispatch.lua's `submit`): [-1] if the record exists
        already, the quota's refusal, or [1, tokens left, ms until full, ready messages ahead];
        [2, -1, -1, ahead] if it exists from this same call (re-sent after a lost reply)."""
        _, args = prepare(message, level, marks=eval_id_of(message))  # the record's own message
        ahead = LEVELS[: LEVELS.index(level) + 1]
        command = ["submit", "api", 0, record_key, json_codec.dumps(creation), quota, *args, *ahead]
        if not self.min_replicas:
            return list(await self._dispatch(keys=[self.namespace], args=command))
        return await self._submit_replicated(record_key, command)

    async def _submit_replicated(self, record_key: str, command: list[Any]) -> list[Any]:
        """`submit`, then WAIT on the same connection (one pipeline, not a transaction: WAIT
        counts the replicas that have this connection's writes). Fewer replicas than
        `min_replicas` within `wait_ms` is `NotReplicated` (a 503): the caller may send it
        again with the same eval_id."""
        for _ in range(2):
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.evalsha(self._dispatch.sha, 1, self.namespace, *command)
                pipe.execute_command("WAIT", self.min_replicas, self.wait_ms)
                reply, replicas = await pipe.execute(raise_on_error=False)
            if isinstance(reply, redis.exceptions.NoScriptError):  # a new primary: load it there
                self._dispatch.sha = await self.client.script_load(self._dispatch.script)
                continue
            break
        for answer in (reply, replicas):
            if isinstance(answer, Exception):
                raise answer
        reply = list(reply)
        if int(reply[0]) in (1, 2) and int(replicas) < self.min_replicas:
            raise NotReplicated(
                "the submission is not yet on a replica (Redis may be failing over); send it again "
                "with the same eval_id: a 409 then means this one was kept",
                headers={"Retry-After": "1"},
                replicas=int(replicas),
                wanted=self.min_replicas,
            )
        return reply

    async def sweep_orphans(self, page: int = 1000) -> int:
        """Drop message bookkeeping (`eval_of`, `deliveries`) left behind by workers of an
        earlier release; a page per call, so Redis is never held long. Returns how many."""
        dropped = 0
        for hash_name in ("eval_of", "deliveries"):
            cursor = "0"
            while True:
                args = ["sweep", "api", 0, hash_name, cursor, page]
                cursor, count = await self._dispatch(keys=[self.namespace], args=args)
                dropped += int(count)
                if int(cursor) == 0:
                    break
        return dropped

    async def cancel(self, task_id: str) -> bool:
        """Drop a waiting message by its task id; False if none was waiting."""
        return bool(await self._dispatch(keys=[self.namespace], args=["cancel", "api", 0, task_id]))

    async def queue_sizes(self) -> dict[str, int]:
        return size_report(await self._dispatch(keys=[self.namespace], args=["sizes", "api", 0, *LEVELS]))
