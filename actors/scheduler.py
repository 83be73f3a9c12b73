"""`crucible scheduler`: periodiq sending the scheduled actors, plus a heartbeat operators see.

Run one or several (for availability): each tick is enqueued once whatever their number.
"""

from __future__ import annotations

import threading
import time

import redis

from evaluations.redis_keys import RedisKeys
from infra.redis_client import sync_client_for
from infra.settings import Settings
from middleware.state import worker_name

#: A scheduler is shown as gone when silent this long.
SCHEDULER_BEAT_S = 5
#: A scheduler silent this long is no longer listed.
FORGET_AFTER_S = 3600


def start_heartbeat(settings: Settings) -> threading.Thread:
    """Publish `{ns}:schedulers` (zset name -> last beat, ms) every few seconds, in a daemon thread."""
    client = sync_client_for(settings)
    name = worker_name()

    def beat() -> None:
        key = RedisKeys(settings.namespace).schedulers
        while True:
            try:
                seconds, micros = client.time()  # Redis's clock, as the status page reads it
                now_ms = seconds * 1000 + micros // 1000
                client.zadd(key, {name: now_ms})
                client.zremrangebyscore(key, 0, now_ms - FORGET_AFTER_S * 1000)
            except redis.RedisError:
                pass  # shown as gone until Redis answers again
            time.sleep(SCHEDULER_BEAT_S)

    thread = threading.Thread(target=beat, name="scheduler-heartbeat", daemon=True)
    thread.start()
    return thread


def run(settings: Settings) -> int:
    import periodiq

    start_heartbeat(settings)
    args = periodiq.make_argument_parser().parse_args(["actors.worker:main"])
    return periodiq.main(args)
