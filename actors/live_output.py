"""A run's live output, published on its evaluation's event channel as the executor streams it.

The executor has already bounded it (`evaluations.live_output`: chunks at most every 100 ms or
4 KiB per stream, never past the stored cap). Here each chunk becomes an event
(`{"eval_id", "type": "output" or "error", "data", "truncated"?, "seq", "at_ms"}`) published on
`RedisKeys.events_of(eval_id)`, where the API's event streams relay it to followers; it is never
stored. Publishing never holds the run up: chunks go out from a task of their own, those that
come meanwhile in one pipeline after, and once a publish fails or takes longer than
`PUBLISH_TIMEOUT_S` the attempt publishes nothing more (its result is stored as ever). The
chunks not sent when the run ends (all of a short program's) go with its result: the worker
publishes them in the MULTI that commits the final status, just before it, so they cost no
round trip of their own and every follower gets them before that status.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError

from evaluations import json_codec
from evaluations.live_output import live_event

log = structlog.get_logger(__name__)

#: A publish taking longer than this gives up the attempt's live output.
PUBLISH_TIMEOUT_S = 1.0


class LivePublisher:
    """Publishes one attempt's chunks, in order, without ever making its run wait or fail."""

    def __init__(self, client: aioredis.Redis, channel: str, eval_id: str) -> None:
        self.client = client
        self.channel = channel
        self.eval_id = eval_id
        self.seq = 0
        #: chunks not published: Redis failed or was too slow, or the run ended first
        self.dropped = 0
        self._waiting: list[str] = []
        self._sender: asyncio.Task[None] | None = None
        #: the sender's start, due in the loop's next turn: chunks that come with the result
        #: (all of a short program's) are taken by `finish` first and never need it
        self._starting: asyncio.Handle | None = None
        self._given_up = False

    def add(self, chunk: dict[str, Any]) -> None:
        """One chunk as the executor sent it (`{"type", "data", "truncated"?}`); returns at once."""
        if self._given_up:
            self.dropped += 1
            return
        try:
            self.seq += 1
            event = live_event(self.eval_id, chunk, self.seq, int(time.time() * 1000))
            self._waiting.append(json_codec.dumps(event))
            if self._sender is None and self._starting is None:
                self._starting = asyncio.get_running_loop().call_soon(self._start)
        except Exception as exc:  # never the run's failure
            self._give_up(exc)

    def _start(self) -> None:
        self._starting = None
        if self._waiting and self._sender is None and not self._given_up:
            self._sender = asyncio.create_task(self._send(), name=f"live-output-{self.eval_id}")

    async def finish(self, wait_s: float = PUBLISH_TIMEOUT_S) -> list[tuple[str, str]]:
        """The run has ended: the chunks not sent yet, as (channel, event), for the worker to
        publish in the MULTI that commits the final status, just before it (`settle_with`: no
        round trip of their own). A publish still in flight is waited for (at most `wait_s`),
        so it goes first. Nothing once publishing was given up; nothing more after this."""
        trailing, self._waiting = self._waiting, []
        if self._starting is not None:
            self._starting.cancel()
            self._starting = None
        sender = self._sender
        if sender is not None:
            done, _ = await asyncio.wait({sender}, timeout=wait_s)
            if not done:
                self._give_up(TimeoutError(f"live output not published within {wait_s}s"))
        given_up = self._given_up
        self.abandon()
        if given_up:
            self.dropped += len(trailing)
            return []
        return [(self.channel, event) for event in trailing]

    def abandon(self) -> None:
        """Stop publishing now (the run failed or the worker is stopping)."""
        self._given_up = True
        self.dropped += len(self._waiting)
        self._waiting = []
        if self._starting is not None:
            self._starting.cancel()
            self._starting = None
        if self._sender is not None:
            self._sender.cancel()

    async def _send(self) -> None:
        try:
            while self._waiting and not self._given_up:
                batch, self._waiting = self._waiting, []
                try:
                    async with asyncio.timeout(PUBLISH_TIMEOUT_S):
                        async with self.client.pipeline(transaction=False) as pipe:
                            for event in batch:
                                pipe.publish(self.channel, event)
                            await pipe.execute()
                except (RedisError, OSError, TimeoutError) as exc:
                    self.dropped += len(batch)
                    self._give_up(exc)
                except asyncio.CancelledError:  # abandoned: maybe published, counted as not
                    self.dropped += len(batch)
                    raise
        finally:
            self._sender = None

    def _give_up(self, exc: BaseException) -> None:
        if not self._given_up:
            log.warning("live_output.dropped", eval_id=self.eval_id, error=f"{type(exc).__name__}: {exc}")
        self._given_up = True
        self.dropped += len(self._waiting)
        self._waiting = []
