"""Followers of evaluations' status changes, sharing one Redis subscription per process."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from app.api.event_streams import EventStreams
from evaluations.store import EvaluationStore, NewEvaluation


async def test_followers_come_and_go_while_the_connection_checks_its_health(
    redis_url: str, namespace: str
) -> None:
    """With no follower left, redis-py checks the idle connection's health before the next
    SUBSCRIBE by reading a PING's answer itself, racing the reader ("read() called while
    another coroutine is already waiting"): the next follower failed."""
    client = aioredis.Redis.from_url(redis_url, decode_responses=True, health_check_interval=0.2)
    store = EvaluationStore(client, namespace, retention_seconds=3600)
    async with client.pipeline(transaction=True) as pipe:
        store.write_new(pipe, NewEvaluation("e", "print(1)", "python", 5, "default", False, {}))
        await pipe.execute()
    streams = EventStreams(client, store)
    try:
        for _ in range(8):
            follower = streams.follow("e")
            assert (await anext(follower))["status"] == "queued"
            await follower.aclose()  # the last follower leaves: the channel is unsubscribed
            await asyncio.sleep(0.4)  # a health check falls due
        follower = streams.follow("e")
        assert (await anext(follower))["status"] == "queued"
        await store.transition("e", "running", ("queued",))
        assert (await asyncio.wait_for(anext(follower), 5))["status"] == "running"
        await follower.aclose()
    finally:
        await streams.close()
        await client.aclose()
