"""The Celery side of the benchmarks (Redis broker, results ignored), as the service we replace
would run it: `noop` only counts itself; `evaluate` runs the code on the same executor service,
stores the result in a Redis hash, as the seed service stored its records, and counts itself."""

from __future__ import annotations

import json
import os
import time

import httpx
import redis
from celery import Celery

app = Celery("bench", broker=os.environ["BENCH_REDIS_URL"])
app.conf.update(
    task_ignore_result=True,
    broker_transport_options={"global_keyprefix": os.environ["BENCH_NAMESPACE"] + ":"},
    worker_hijack_root_logger=False,
)
_redis = redis.Redis.from_url(os.environ["BENCH_REDIS_URL"])
_http = httpx.Client(timeout=60)


@app.task(name="bench.noop")
def noop(done_key: str) -> None:
    _redis.incr(done_key)


@app.task(name="bench.evaluate")
def evaluate(eval_id: str, code: str, sent_at: float, done_key: str) -> None:
    response = _http.post(
        f"{os.environ['EXECUTOR_SERVICE_URL']}/execute",
        json={"eval_id": eval_id, "code": code, "language": "python"},
        headers={"authorization": f"Bearer {os.environ['EXECUTOR_SECRET']}"},
    )
    response.raise_for_status()
    with _redis.pipeline() as pipe:
        pipe.hset(f"{done_key}:results", eval_id, json.dumps(response.json()))
        pipe.rpush(f"{done_key}:latency_ms", (time.time() - sent_at) * 1000)
        pipe.incr(done_key)
        pipe.execute()
