"""The same no-op task on Celery (Redis broker, results ignored)."""

from __future__ import annotations

import os

import redis
from celery import Celery

app = Celery("bench", broker=os.environ["BENCH_REDIS_URL"])
app.conf.update(
    task_ignore_result=True,
    broker_transport_options={"global_keyprefix": os.environ["BENCH_NAMESPACE"] + ":"},
    worker_hijack_root_logger=False,
)
_counter = redis.Redis.from_url(os.environ["BENCH_REDIS_URL"])


@app.task(name="bench.noop")
def noop(done_key: str) -> None:
    _counter.incr(done_key)
