"""Following evaluations' status changes live, for every follower of one process over one Redis
subscription.

A subscription holds its connection for as long as it lasts. With one per follower, a hundred
open event streams took the whole Redis pool of an API process, and every other request waited
for a connection. Here one redis-py `PubSub` carries the channels of all followers, its own
`run()` loop hands each message to the followers of its channel, and a follower holds only a
queue.

A run's live output (`evaluations.live_output`: chunks of what it writes, published on the same
channel while it runs, never recorded) goes only to followers that asked for it, and never
counts as a status change.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import anyio
import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError

from evaluations import json_codec
from evaluations.live_output import is_live
from evaluations.status import TERMINAL
from evaluations.store import EvaluationStore, decode_event

log = structlog.get_logger(__name__)

#: After the subscription fails (Redis away), wait this long before reading again.
RETRY_AFTER_S = 1.0


class EventStreams:
    """Each status change of an evaluation, to any number of followers in this process."""

    def __init__(self, client: aioredis.Redis, store: EvaluationStore) -> None:
        self.store = store
        self.pubsub = client.pubsub()
        #: channel -> the queues of the followers on it
        self.followers: dict[str, set[asyncio.Queue[dict[str, Any]]]] = {}
        #: the queues of followers that take live output too
        self.live_followers: set[asyncio.Queue[dict[str, Any]]] = set()
        self._reader: asyncio.Task[None] | None = None
        self._starting = asyncio.Lock()

    async def follow(
        self, eval_id: str, keepalive: float = 15.0, live: bool = False
    ) -> AsyncIterator[dict[str, Any] | None]:
        """Each status change of `eval_id`, past then live, ending after a final one; with
        `live`, also each chunk of output its run publishes from then on (`is_live`), as it
        comes (the worker publishes them all before it records the final status).

        Yields None when nothing happened for `keepalive` seconds, so a stream can ping; the
        recorded timeline is read again then, so a change published while the subscription was
        reconnecting is still seen.
        """
        channel = self.store.keys.events_of(eval_id)
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        await self._join(channel, queue)
        if live:  # before anything is delivered: nothing was awaited since the subscription
            self.live_followers.add(queue)
        try:
            seen: set[tuple[str, int]] = set()
            news = await self.store.events(eval_id)
            while True:
                for event in news:
                    if is_live(event):
                        yield event
                        continue
                    mark = (event["status"], event["at_ms"])
                    if mark in seen:
                        continue  # published after we subscribed and also in the timeline
                    seen.add(mark)
                    yield event
                    if event["status"] in TERMINAL:
                        return
                try:
                    news = [await asyncio.wait_for(queue.get(), keepalive)]
                except TimeoutError:
                    yield None
                    news = await self.store.events(eval_id)
        finally:
            self.live_followers.discard(queue)
            await self._leave(channel, queue)

    async def _join(self, channel: str, queue: asyncio.Queue[dict[str, Any]]) -> None:
        await self._start()
        first = channel not in self.followers
        self.followers.setdefault(channel, set()).add(queue)
        if first:
            try:
                await self.pubsub.subscribe(**{channel: self._deliver})
            except BaseException:
                await self._leave(channel, queue)
                raise

    async def _start(self) -> None:
        """Start the reader, subscribed first to a channel of its own that it keeps: redis-py
        checks an idle connection's health before a command by sending PING and reading the
        answer itself, which would race the reader, unless the connection is subscribed."""
        async with self._starting:
            if self._reader is None or self._reader.done():
                await self.pubsub.subscribe(**{self.store.keys.readers_channel: self._deliver})
                self._reader = asyncio.create_task(self._read(), name="event-streams")

    async def _leave(self, channel: str, queue: asyncio.Queue[dict[str, Any]]) -> None:
        queues = self.followers.get(channel, set())
        queues.discard(queue)
        if queues or channel not in self.followers:
            return
        del self.followers[channel]
        # a follower usually leaves by being cancelled (its client went away): finish anyway
        with anyio.CancelScope(shield=True), contextlib.suppress(RedisError, OSError):
            await self.pubsub.unsubscribe(channel)

    async def _deliver(self, message: dict[str, Any]) -> None:
        queues = self.followers.get(message["channel"], ())
        if queues:
            raw = message["data"]
            event = json_codec.loads(raw)
            if is_live(event):
                queues = [q for q in queues if q in self.live_followers]
            else:
                event = decode_event(raw)
            for queue in queues:
                queue.put_nowait(event)

    async def _read(self) -> None:
        """redis-py's loop of the subscription, kept alive across a Redis restart (it
        subscribes again to every channel when it reconnects)."""

        async def note(exc: BaseException, _: object) -> None:
            log.warning("event_streams.read_failed", error=f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(RETRY_AFTER_S)

        await self.pubsub.run(exception_handler=note, poll_timeout=1.0)

    async def last_within(self, eval_id: str, seconds: float) -> dict[str, Any] | None:
        """The latest status change of `eval_id` within `seconds`: its final one if that came in
        time, else the last seen (None: none). Followed as `follow` does (the recorded timeline
        first, so a change that came already counts), holding no connection of its own."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        last = None
        with contextlib.suppress(TimeoutError):
            async with (
                asyncio.timeout_at(deadline),
                contextlib.aclosing(self.follow(eval_id, keepalive=min(seconds, 5.0))) as changes,
            ):
                async for change in changes:
                    last = change or last  # None: a keep-alive (the timeline was read again)
                    if loop.time() >= deadline:
                        break  # should a cancellation at the deadline be lost (asyncio.wait_for, 3.11)
        return last

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        await self.pubsub.aclose()
