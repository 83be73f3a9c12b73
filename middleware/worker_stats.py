"""Each worker process publishes who it is and what it has done, for status pages and metrics.

Every `interval` seconds a worker writes `{ns}:worker:<broker id>` (a hash: name, host, pid,
queues, actors, concurrency, active, processed, failed, retried, started, last seen, load) and its
last-seen time in `{ns}:workers`. A worker that stops cleanly removes itself; one that dies
stops updating and is shown as gone once its last-seen time is older than the heartbeat
timeout. Retries are also counted per policy in `{ns}:stats` (`retry:<policy>`), which
survives worker restarts.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from typing import Any

import structlog
from dramatiq.middleware import Middleware
from redis.exceptions import RedisError

from evaluations.redis_keys import RedisKeys
from evaluations.retry_policies import RETRY_POLICIES, Policies
from middleware.state import SETTLE, worker_name

log = structlog.get_logger(__name__)

#: A published worker record outlives its last update by this much, then Redis drops it.
RECORD_TTL_S = 3600


class WorkerStats(Middleware):
    """Counts this process's messages and publishes them with a heartbeat."""

    def __init__(self, interval: float = 2.0, policies: Policies = RETRY_POLICIES) -> None:
        self.interval = interval
        #: the retry policies this worker's Backoff uses, published so operators see them
        self.policies = json.dumps(policies, sort_keys=True)
        self.lock = threading.Lock()
        self.counts = {"active": 0, "processed": 0, "failed": 0, "retried": 0}
        self.stopped = threading.Event()

    def _add(self, **deltas: int) -> None:
        with self.lock:
            for name, delta in deltas.items():
                self.counts[name] += delta

    def before_process_message(self, broker: Any, message: Any) -> None:
        self._add(active=1)

    def after_process_message(
        self, broker: Any, message: Any, *, result: Any = None, exception: BaseException | None = None
    ) -> None:
        plan = message.options.get(SETTLE) or {}
        retried = plan.get("command") == "retry"
        self._add(active=-1, processed=1, retried=int(retried))
        if retried and plan.get("policy"):
            try:
                broker.client.hincrby(RedisKeys(broker.namespace).stats, f"retry:{plan['policy']}", 1)
            except RedisError as exc:
                log.warning("stats.retry_count_lost", error=str(exc))

    def after_skip_message(self, broker: Any, message: Any) -> None:
        self._add(active=-1, processed=1)

    def after_nack(self, broker: Any, message: Any) -> None:
        self._add(failed=1)

    def after_worker_boot(self, broker: Any, worker: Any) -> None:
        self.started = time.time()
        self.threads = worker.worker_threads
        threading.Thread(target=self._publish_loop, args=(broker,), name="worker-stats", daemon=True).start()

    def before_worker_shutdown(self, broker: Any, worker: Any) -> None:
        self.stopped.set()
        try:
            broker.client.delete(RedisKeys(broker.namespace).worker(broker.broker_id))
            broker.client.zrem(RedisKeys(broker.namespace).workers, broker.broker_id)
        except RedisError:
            pass  # it will be shown as gone when its last-seen time ages

    def _publish_loop(self, broker: Any) -> None:
        while True:
            try:
                self.publish(broker)
            except RedisError as exc:
                log.warning("stats.publish_failed", error=str(exc))
            if self.stopped.wait(self.interval):
                return

    def publish(self, broker: Any) -> None:
        with self.lock:
            counts = dict(self.counts)
        now_ms = int(time.time() * 1000)
        record = {
            "id": broker.broker_id,
            "name": worker_name(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "queues": ",".join(broker.levels),
            "actors": ",".join(sorted(broker.actors)),
            "concurrency": self.threads,
            "started_ms": int(self.started * 1000),
            "last_seen_ms": now_ms,
            "load": round(os.getloadavg()[0], 2),
            "retry_policies": self.policies,
            **counts,
        }
        key = RedisKeys(broker.namespace).worker(broker.broker_id)
        with broker.client.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping=record)
            pipe.expire(key, RECORD_TTL_S)
            pipe.zadd(RedisKeys(broker.namespace).workers, {broker.broker_id: now_ms})
            pipe.zremrangebyscore(RedisKeys(broker.namespace).workers, 0, now_ms - RECORD_TTL_S * 1000)
            pipe.execute()
