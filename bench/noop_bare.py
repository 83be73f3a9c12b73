"""The same no-op task on bare Dramatiq (its RedisBroker and default middleware)."""

from __future__ import annotations

import os

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker

broker = RedisBroker(url=os.environ["BENCH_REDIS_URL"], namespace=os.environ["BENCH_NAMESPACE"])
dramatiq.set_broker(broker)
_counter = redis.Redis.from_url(os.environ["BENCH_REDIS_URL"])


@dramatiq.actor(max_retries=0)
def noop(done_key: str) -> None:
    _counter.incr(done_key)
