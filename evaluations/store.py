"""Evaluation records in Redis: one hash each, indexes by time and status, a timeline.

Every status change goes through one Lua function (`lua/status.lua`'s `transition()`, run alone
by `lua/transition.lua` or inside a broker operation) that checks the
change is allowed from the current status, so racing writers (a cancel and a finishing run,
a redelivered message) leave exactly one final status.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import redis.asyncio as aioredis
import structlog

from evaluations import json_codec
from evaluations.queue import task_id_of
from evaluations.redis_keys import RedisKeys
from evaluations.status import STATUSES, TERMINAL, Status, Transition

log = structlog.get_logger(__name__)

#: Upper bounds (ms) of the latency, wait and run-time histograms kept by status.lua.
HISTOGRAM_BOUNDS_MS = (10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000)

#: What a list row holds, and how many recent evaluations the list's filters look through.
LIST_FIELDS = ("id", "status", "created_at", "code_preview", "language", "queue", "queue_system")
#: How much of the code a list row shows. Stored apart from the code at submission, so a
#: listing never reads whole programs (up to 64 KiB each) to show this much of them.
PREVIEW_CHARS = 100
FILTER_FIELDS = ("id", "language", "queue", "status")
LIST_SCAN = 5000

#: `transition()`, for scripts that change statuses (prepended to them).
STATUS_FUNCTIONS_LUA = (Path(__file__).parent / "lua" / "status.lua").read_text()
TRANSITION_LUA = STATUS_FUNCTIONS_LUA + (Path(__file__).parent / "lua" / "transition.lua").read_text()
#: One bounded step of making room in a nearly full Redis (see the script's header).
SHED_LUA = (Path(__file__).parent / "lua" / "shed.lua").read_text()
#: Records one shed step removes (or looks at for outputs to trim) at most: a few ms of Redis.
SHED_STEP = 200

#: Wall time keeps its fraction: a run's wall time is often below one millisecond.
_FLOAT_FIELDS = {"runtime_ms"}
_INT_FIELDS = {
    "exit_code",
    "timeout",
    "retries",
    "code_bytes",
    "cpu_ms",
    "peak_memory_kb",
    "signal",
    "max_running",
    "passed",
    "total",
}
_BOOL_FIELDS = {"output_truncated", "error_truncated", "priority", "internal_error"}
#: A test-case submission's per-case results and its compile step, kept as JSON.
_JSON_FIELDS = {"cases", "compile"}


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _encode(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, dict | list):
        return json_codec.dumps(value)
    return "" if value is None else str(value)


def _decode(record: dict[str, Any]) -> dict[str, Any]:
    """A record (or a status change) as typed values: what Redis and the Lua scripts keep as
    strings reads back as the numbers and flags the API shows, the same in every answer."""
    out: dict[str, Any] = {}
    for key, raw in record.items():
        if key in _FLOAT_FIELDS:
            out[key] = float(raw) if raw not in ("", None) else None
        elif key in _INT_FIELDS:
            out[key] = int(float(raw)) if raw not in ("", None) else None
        elif key in _BOOL_FIELDS:
            out[key] = raw == "1"
        elif key == "metadata":
            out[key] = json_codec.loads(raw) if raw else {}
        elif key in _JSON_FIELDS:
            out[key] = json_codec.loads(raw) if raw else None
        else:
            out[key] = raw if raw != "" else None
    return out


def decode_event(raw: str | bytes) -> dict[str, Any]:
    """One status change, as its timeline entry or its published message holds it."""
    return _decode(json_codec.loads(raw))


@dataclass(frozen=True)
class ShedStep:
    """What one step of `EvaluationStore.shed` did."""

    removed: int
    trimmed: int
    bytes_trimmed: int
    #: it stopped at its bound while looking for outputs to trim: there may be more
    more: bool

    @property
    def progressed(self) -> bool:
        """Whether another step may still free something."""
        return bool(self.removed or self.trimmed or self.more)


@dataclass(frozen=True)
class StatusChange:
    """One guarded status change, as arguments of `lua/transition.lua`.

    Built by whoever needs the change to commit together with other writes (a broker
    operation, a DLQ entry) in one MULTI; `EvaluationStore.transition` runs one alone.
    """

    eval_id: str
    status: str
    allowed_from: tuple[str, ...]
    fields: dict[str, Any]
    expect: dict[str, str] = field(default_factory=dict)
    #: when it happened, if not now (a result read later from another system)
    at_ms: int | None = None

    @classmethod
    def by(
        cls,
        transition: Transition,
        eval_id: str,
        status: str,
        fields: dict[str, Any],
        expect: dict[str, str] | None = None,
        at_ms: int | None = None,
    ) -> StatusChange:
        """The change `transition` makes to `status` (which it must be able to set)."""
        transition.check(status)
        return cls(eval_id, status, transition.allowed_from, fields, expect or {}, at_ms)

    def args(self) -> list[Any]:
        encoded = {k: _encode(v) for k, v in self.fields.items()}
        return [
            self.eval_id,
            self.status,
            self.at_ms or int(time.time() * 1000),
            ",".join(self.allowed_from),
            json_codec.dumps(encoded),
            json_codec.dumps(self.expect),
            "1" if self.status in TERMINAL else "0",
            ",".join(map(str, HISTOGRAM_BOUNDS_MS)),
        ]


@dataclass(frozen=True)
class NewEvaluation:
    """What a submission records before it is queued."""

    eval_id: str
    code: str
    language: str
    timeout: float
    level: str
    priority: bool
    metadata: dict[str, Any]
    #: which system runs it while migrating from the legacy Celery deployment
    queue_system: str = "dramatiq"
    #: set on a shadow copy: the evaluation it copies (kept out of the split's counters)
    shadow_of: str | None = None
    #: the API key that submitted it (None: the Celery shim or a direct message)
    owner: str | None = None
    #: how many of the owner's evaluations may run at once (its tier's `max_running`; 0: any)
    max_running: int = 0
    #: the Celery result-backend key the evaluation's changes are written to (status.lua), when
    #: it came from a Celery producer (app/celery/ingress.py)
    celery_meta: str | None = None
    #: the Celery result backend those changes go to, when it is not this Redis database: its
    #: id (status.lua then leaves each change in its outbox for app/celery/results.py)
    celery_results: str | None = None
    #: where its final result is POSTed, and the headers asked for (evaluations/webhooks.py)
    callback_url: str | None = None
    callback_headers: dict[str, str] | None = None
    created_at: str = field(default_factory=utc_now)

    def fields(self) -> dict[str, str]:
        return (
            {
                "id": self.eval_id,
                "task_id": task_id_of(self.eval_id),
                "code": self.code,
                "code_preview": self.code[:PREVIEW_CHARS],
                "code_bytes": _encode(len(self.code.encode())),
                "language": self.language,
                "status": "queued",
                "created_at": self.created_at,
                "timeout": _encode(self.timeout),
                "queue": self.level,
                "priority": _encode(self.priority),
                "metadata": _encode(self.metadata),
                "retries": "0",
                "queue_system": self.queue_system,
            }
            | ({"shadow_of": self.shadow_of} if self.shadow_of else {})
            | ({"owner": self.owner} if self.owner else {})
            | ({"max_running": str(self.max_running)} if self.owner and self.max_running else {})
            | ({"celery_meta": self.celery_meta} if self.celery_meta else {})
            | ({"celery_results": self.celery_results} if self.celery_meta and self.celery_results else {})
            | (self._callback_fields() if self.callback_url else {})
        )


    def _callback_fields(self) -> dict[str, str]:
        return {
            "callback_url": self.callback_url or "",
            "callback_headers": _encode(self.callback_headers or {}),
            "callback_status": "waiting",
            "callback_attempts": "0",
        }


class StatusForwarder:
    """Sends each status change to the optional storage service as `PUT /evaluations/{id}`.

    Failures raise (httpx errors): a worker's retry policy then applies to them.
    """

    def __init__(self, base_url: str, client: httpx.AsyncClient) -> None:
        self.base_url = base_url
        self.client = client

    async def send(self, eval_id: str, payload: dict[str, Any]) -> None:
        response = await self.client.put(f"{self.base_url}/evaluations/{eval_id}", json=payload, timeout=10)
        response.raise_for_status()


class EvaluationStore:
    """Async access to evaluation records; one per process, sharing its Redis pool."""

    def __init__(
        self,
        client: aioredis.Redis,
        namespace: str,
        *,
        retention_seconds: int,
        forwarder: StatusForwarder | None = None,
    ) -> None:
        self.client = client
        self.ns = namespace
        self.retention_seconds = retention_seconds
        self.forwarder = forwarder
        self.keys = RedisKeys(namespace)
        self._transition = client.register_script(TRANSITION_LUA)
        self._shed = client.register_script(SHED_LUA)

    def key(self, eval_id: str) -> str:
        """The record's hash (the broker's submit takes it by name)."""
        return self.keys.record(eval_id)

    def creation(self, evaluation: NewEvaluation, count: bool = True) -> list[list[str]]:
        """The commands that create the record: its hash, indexes, first event and counters.

        `count` adds it to the submitted counters (not for shadow copies, nor before a send
        succeeded). As data, so one Lua call (the broker's `submit`) can run them with the
        enqueue, or a MULTI can hold them (`write_new`).
        """
        fields = evaluation.fields()
        created_ms = int(time.time() * 1000)
        event = json_codec.dumps(
            {"eval_id": evaluation.eval_id, "status": "queued", "previous_status": None, "at_ms": created_ms}
        )
        at = str(created_ms)
        keys = self.keys
        key = keys.record(evaluation.eval_id)
        record = {**fields, "submitted_at_ms": at, "queued_at_ms": at}
        ops = [
            ["hset", key, *(part for item in record.items() for part in item)],
            ["zadd", keys.evaluations, at, evaluation.eval_id],
            ["zadd", keys.by_status(Status.QUEUED), at, evaluation.eval_id],
        ]
        if evaluation.owner:
            ops.append(["zadd", keys.by_owner(evaluation.owner), at, evaluation.eval_id])
            ops.append(["sadd", keys.active(evaluation.owner), evaluation.eval_id])
        ops.append(["rpush", keys.timeline(evaluation.eval_id), event])
        if count and evaluation.shadow_of is None:
            minute = keys.minute(created_ms // 60000)
            ops.append(["hincrby", keys.stats, f"submitted:{evaluation.queue_system}", "1"])
            ops.append(["hincrby", minute, "submitted", "1"])
            ops.append(["expire", minute, "7200"])
        ops.append(["publish", keys.events, event])
        ops.append(["publish", keys.events_of(evaluation.eval_id), event])
        return ops

    def write_new(
        self, pipe: aioredis.client.Pipeline, evaluation: NewEvaluation, count: bool = True
    ) -> None:
        """Queue the record's creation on `pipe` (inside the caller's MULTI)."""
        for op in self.creation(evaluation, count):
            pipe.execute_command(*op)

    async def delete_in(self, pipe: aioredis.client.Pipeline, eval_id: str, owner: str | None = None) -> None:
        """Queue the removal of one evaluation, its timeline and its index entries on `pipe`."""
        pipe.delete(self.keys.record(eval_id), self.keys.timeline(eval_id))
        for index in (self.keys.evaluations, *(self.keys.by_status(s) for s in STATUSES)):
            pipe.zrem(index, eval_id)
        if owner:
            pipe.zrem(self.keys.by_owner(owner), eval_id)

    async def get(self, eval_id: str) -> dict[str, Any] | None:
        raw = await self.client.hgetall(self.keys.record(eval_id))
        return _decode(raw) if raw else None

    async def transition_in(self, pipe: aioredis.client.Pipeline, change: StatusChange) -> None:
        """Add a guarded status change to `pipe`, to commit with the caller's other writes."""
        await self._transition(keys=[self.ns], args=change.args(), client=pipe)

    async def transition(
        self,
        eval_id: str,
        status: str,
        allowed_from: Iterable[str],
        expect: dict[str, str] | None = None,
        **fields: Any,
    ) -> tuple[bool, str | None]:
        """Set `status` (and `fields`) if the record is in one of `allowed_from` (and `expect` holds).

        Returns (done, status now): a refused change reports the status that stood.
        """
        change = StatusChange(eval_id, status, tuple(allowed_from), fields, expect or {})
        done, current = await self._transition(keys=[self.ns], args=change.args())
        if done and self.forwarder:
            await self.forwarder.send(eval_id, {"status": status, **fields})
        return bool(done), (current or None)

    async def announce(self, evaluation: NewEvaluation) -> None:
        """Send a new record's first status (queued) to the storage service, if there is one.

        Best effort: a submission is not refused because the storage service is down.
        """
        if self.forwarder:
            fields = evaluation.fields()
            payload = {k: fields[k] for k in ("status", "language", "created_at", "code")}
            try:
                await self.forwarder.send(evaluation.eval_id, payload)
            except httpx.HTTPError as exc:
                log.warning("storage.announce_failed", eval_id=evaluation.eval_id, error=str(exc))

    async def forward_current(self, eval_id: str) -> None:
        """Send the record as it stands to the storage service (a retried delivery)."""
        record = await self.get(eval_id) if self.forwarder else None
        if self.forwarder and record:
            payload = {k: record.get(k) for k in ("status", "output", "error", "exit_code", "completed_at")}
            await self.forwarder.send(eval_id, payload)

    async def events(self, eval_id: str) -> list[dict[str, Any]]:
        return [decode_event(e) for e in await self.client.lrange(self.keys.timeline(eval_id), 0, -1)]

    async def list(
        self,
        *,
        limit: int,
        offset: int,
        status: str | None = None,
        language: str | None = None,
        queue: str | None = None,
        search: str | None = None,
        owner: str | None = None,
    ) -> tuple[list[dict[str, Any]], int]:
        """Newest first; returns one page and the total that matches.

        Status has its own index. Language, queue and id search filter the newest
        `LIST_SCAN` evaluations of that index (recent history, which is what they serve).
        """
        index = self.keys.by_status(status) if status else self.keys.evaluations
        if owner:  # one key's own evaluations: its index, the status then filtered like the rest
            index = self.keys.by_owner(owner)
        elif not (language or queue or search):
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.zrevrange(index, offset, offset + limit - 1)
                pipe.zcard(index)
                ids, total = await pipe.execute()
            return await self._rows(ids), total
        ids = await self.client.zrevrange(index, 0, LIST_SCAN - 1)
        if search:
            ids = [i for i in ids if search in i]
        rows = await self._rows(ids, FILTER_FIELDS)  # no code: it may be large
        matching = [
            r["id"]
            for r in rows
            if (not language or r["language"] == language)
            and (not queue or r["queue"] == queue)
            and (not owner or not status or r["status"] == status)
        ]
        return await self._rows(matching[offset : offset + limit]), len(matching)

    async def _rows(self, ids: list[str], fields: tuple[str, ...] = LIST_FIELDS) -> list[dict[str, Any]]:
        if not ids:
            return []
        async with self.client.pipeline(transaction=False) as pipe:
            for eval_id in ids:
                pipe.hmget(self.keys.record(eval_id), fields)
            rows = [dict(zip(fields, r, strict=True)) for r in await pipe.execute() if r[0] is not None]
        if "code_preview" in fields:
            await self._preview_older(rows)
        return rows

    async def _preview_older(self, rows: list[dict[str, Any]]) -> None:
        """Records written before previews were stored apart (gone within the retention)
        get theirs from the code, read only for them."""
        older = [row for row in rows if row["code_preview"] is None]
        if older:
            async with self.client.pipeline(transaction=False) as pipe:
                for row in older:
                    pipe.hget(self.keys.record(row["id"]), "code")
                codes = await pipe.execute()
            for row, code in zip(older, codes, strict=True):
                row["code_preview"] = (code or "")[:PREVIEW_CHARS]

    async def shed(
        self, min_retention_s: float, *, trim_bytes: int = 0, limit: int = SHED_STEP, now: float | None = None
    ) -> ShedStep:
        """One bounded step of making room (`lua/shed.lua`): the `limit` oldest finished
        evaluations created more than `min_retention_s` ago are removed as `cleanup` removes
        them; when there are none, outputs and errors over `trim_bytes` of finished ones are
        cut to it. Queued and running evaluations are never touched."""
        cutoff_ms = int(((now or time.time()) - min_retention_s) * 1000)
        removed, trimmed, freed, more = await self._shed(
            keys=[],
            args=[self.ns, cutoff_ms, limit, trim_bytes, ",".join(TERMINAL), ",".join(STATUSES)],
        )
        return ShedStep(int(removed), int(trimmed), int(freed), bool(more))

    async def cleanup(self, now: float | None = None) -> int:
        """Delete finished evaluations created before the retention window, with their timelines
        and index entries; queued or running ones stay, however old. Returns how many records
        this call deleted.

        Safe to run twice at once or again after a crash: every step is idempotent, and
        each record is counted by the one call whose DEL removed it.
        """
        cutoff_ms = int(((now or time.time()) - self.retention_seconds) * 1000)
        removed = 0
        for status in TERMINAL:
            index = self.keys.by_status(status)
            while old := await self.client.zrangebyscore(index, 0, cutoff_ms, start=0, num=500):
                async with self.client.pipeline(transaction=False) as pipe:
                    for eval_id in old:
                        pipe.hget(self.keys.record(eval_id), "owner")
                    owners = await pipe.execute()
                async with self.client.pipeline(transaction=True) as pipe:
                    for eval_id, owner in zip(old, owners, strict=True):
                        pipe.delete(self.keys.record(eval_id))
                        await self.delete_in(pipe, eval_id, owner)
                    results = await pipe.execute()
                stride = len(results) // len(old)
                removed += sum(1 for i in range(len(old)) if results[i * stride])
        return removed
