"""Celery result records for producers whose `CELERY_RESULT_BACKEND` is not Crucible's own Redis
database: another database of the broker's server (the platform's later configuration keeps
results in database 1) or another Redis.

With each status change of such an evaluation, evaluations/lua/status.lua leaves the task's new
record in an outbox in Crucible's Redis, in the same atomic call as the change, numbered. This
relay, run by `crucible celery-ingress`, writes it to the backend as Celery's RedisBackend does
(SET with a day's expiry, PUBLISH on the key's channel), and only then drops it from the outbox,
if no newer record replaced it meanwhile. A record that could not be written (the backend away,
the relay killed) stays, and is written when the relay looks again: never lost.

On the backend one small script keeps the number of the last record written, under
`{<result key>}.crucible-seq` (the key's own cluster slot), and refuses any number not above it:
a record written again after a crash is neither rewritten nor published twice, and an older
record (a stalled relay, two relays) never replaces a newer one.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from typing import Any

import redis.asyncio as aioredis
import structlog

from evaluations.redis_keys import RedisKeys
from infra.redis_client import async_client, redact_url, redis_location
from infra.settings import Settings

log = structlog.get_logger(__name__)

#: How long a result record is kept, as Celery's `result_expires` default (and status.lua).
RESULT_EXPIRES_S = 86400
#: How long the relay waits for a change before it looks at its stop flag again.
WAKE_S = 1.0
#: How often the whole outbox is tried again while it holds records (one that failed).
SWEEP_EVERY_S = 2.0
#: How long one write to the backend may take before it counts as failed (and is retried).
WRITE_TIMEOUT_S = 5.0
#: How long the relay waits after Crucible's Redis failed it.
RETRY_AFTER_S = 1.0

# KEYS: the result key, its sequence key. ARGV: sequence number, meta JSON, expiry (s).
WRITE_LUA = """
local written = tonumber(redis.call("get", KEYS[2]) or "0")
if written >= tonumber(ARGV[1]) then return 0 end
redis.call("set", KEYS[1], ARGV[2], "EX", ARGV[3])
redis.call("set", KEYS[2], ARGV[1], "EX", ARGV[3])
redis.call("publish", KEYS[1], ARGV[2])
return 1
"""
# KEYS: the outbox. ARGV: the result key, the entry written. Dropped only if still that entry.
FORGET_LUA = """
if redis.call("hget", KEYS[1], ARGV[1]) == ARGV[2] then
    redis.call("hdel", KEYS[1], ARGV[1])
    return 1
end
return 0
"""


def relayed_backend(settings: Settings) -> str | None:
    """The id status.lua files a Celery task's records under when `CELERY_RESULT_BACKEND` is not
    Crucible's own Redis database; None when it is, or unset (written there in the change's own
    Lua call, as before)."""
    url = settings.celery_result_backend
    if not url or redis_location(url) == redis_location(settings.redis_url_or_default):
        return None
    return backend_id(url)


def backend_id(url: str) -> str:
    """A short name for the database `url` reaches (its credentials left out)."""
    return hashlib.sha256(redis_location(url).encode()).hexdigest()[:12]


def sequence_key(result_key: str) -> str:
    """Where the backend keeps the number of `result_key`'s last record written."""
    return "{" + result_key + "}.crucible-seq"


class ResultRelay:
    """Writes what status.lua left in one backend's outbox to that backend."""

    def __init__(self, client: aioredis.Redis, keys: RedisKeys, backend_id: str, url: str) -> None:
        self.client = client
        self.keys = keys
        self.outbox = keys.celery_results(backend_id)
        self.due = keys.celery_results_due(backend_id)
        self.backend_id = backend_id
        #: where the records go, fit to show
        self.shown_url = redact_url(url)
        self.backend = async_client(url, connect_timeout=WRITE_TIMEOUT_S)
        self._write = self.backend.register_script(WRITE_LUA)
        self._forget = client.register_script(FORGET_LUA)

    @classmethod
    def build(cls, client: aioredis.Redis, keys: RedisKeys, settings: Settings) -> ResultRelay | None:
        """The relay `settings` call for, if any."""
        backend_id = relayed_backend(settings)
        if backend_id is None or settings.celery_result_backend is None:
            return None
        return cls(client, keys, backend_id, settings.celery_result_backend)

    async def close(self) -> None:
        await self.backend.aclose()

    async def run(self, stop: asyncio.Event) -> None:
        """Relay until `stop`: each change as it comes, and the whole outbox at start and again
        every few seconds while it holds records."""
        swept = 0.0
        while not stop.is_set():
            try:
                if swept == 0.0:
                    await self.client.hset(
                        self.keys.celery_wire_counts, f"results:{self.backend_id}", self.shown_url
                    )
                    await self.client.delete(self.due)  # the sweep below covers what it named
                if time.monotonic() - swept >= SWEEP_EVERY_S:
                    await self.sweep()
                    swept = time.monotonic()
                popped = await self.client.blpop([self.due], timeout=WAKE_S)
                if popped is not None:
                    await self.deliver(popped[1])
            except Exception as exc:  # either Redis away: the records stay in the outbox
                await self._failed(exc)
                await asyncio.sleep(RETRY_AFTER_S)

    async def sweep(self) -> int:
        """Write every record in the outbox; how many were written."""
        written = 0
        async for result_key, entry in self.client.hscan_iter(self.outbox):
            written += await self.write(result_key, entry)
        return written

    async def deliver(self, result_key: str) -> int:
        """Write `result_key`'s latest record, if it still waits; 1 if it was written now."""
        entry = await self.client.hget(self.outbox, result_key)
        return 0 if entry is None else await self.write(result_key, entry)

    async def write(self, result_key: str, entry: str) -> int:
        """Write one outbox entry ("<seq> <meta JSON>") to the backend, then drop it from the
        outbox unless a newer one replaced it; 1 if the backend took it (0: it had it already)."""
        seq, meta = entry.split(" ", 1)
        keys = [result_key, sequence_key(result_key)]
        took = await asyncio.wait_for(
            self._write(keys=keys, args=[seq, meta, RESULT_EXPIRES_S], client=self.backend), WRITE_TIMEOUT_S
        )
        await self._forget(keys=[self.outbox], args=[result_key, entry])
        log.info("celery_results.written", result_key=result_key, seq=int(seq), fresh=bool(took))
        return int(took)

    async def _failed(self, exc: Exception) -> None:
        error = f"{type(exc).__name__}: {exc}"[:500]
        log.warning("celery_results.paused", error=error)
        failed = {
            f"results:{self.backend_id}:error": error,
            f"results:{self.backend_id}:error_at": str(time.time()),
        }
        try:
            await self.client.hset(self.keys.celery_wire_counts, mapping=failed)
        except Exception:  # Crucible's own Redis away too: the log says it
            pass


async def results_status(client: Any, keys: RedisKeys, counts: dict[str, str]) -> list[dict[str, Any]]:
    """What `/health` says of each backend relayed to (none: results are written in Crucible's
    own Redis): where, how many records wait to be written, the last error and when."""
    relayed = [name.split(":")[1] for name in counts if name.startswith("results:") and name.count(":") == 1]
    async with client.pipeline(transaction=False) as pipe:
        for backend_id in relayed:
            pipe.hlen(keys.celery_results(backend_id))
        pending = await pipe.execute()
    return [
        {
            "backend": counts[f"results:{backend_id}"],
            "pending": int(waiting),
            "last_error": counts.get(f"results:{backend_id}:error"),
            "last_error_at": float(counts.get(f"results:{backend_id}:error_at") or 0) or None,
        }
        for backend_id, waiting in zip(relayed, pending, strict=True)
    ]
