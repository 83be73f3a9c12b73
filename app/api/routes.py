"""The HTTP API (Starlette, fully async): submit evaluations, read their results.

A submission is recorded and enqueued in one Redis transaction before the response goes
out, so an accepted evaluation is never lost and never queued without its record.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

import structlog
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import BaseRoute, Route

from actors.dlq import NotInDLQ, NotRetryable, public_entry
from actors.executor_client import ExecutorUnavailable
from app.api.auth import ApiKeyBackend, caller
from app.api.dashboard import dashboard_routes, root_redirect
from app.api.openapi import openapi_schema
from app.api.ops import OpsApi
from app.migration.tracker import MigrationTracker
from app.services import Services
from app.submission import Submission
from app.submission_input import EVAL_ID_PATTERN, ignored_fields, offered_languages, parse_submission
from evaluations import json_codec
from evaluations.api_keys import PRIORITY_TIERS, ApiKey, KeyStore
from evaluations.errors import (
    Conflict,
    Forbidden,
    InvalidInput,
    NotFound,
    Refusal,
    Refused,
    TooLarge,
    Unavailable,
)
from evaluations.live_output import is_live
from evaluations.queue import LEVELS, task_id_of
from evaluations.status import STATUSES, TERMINAL
from evaluations.views import for_caller, public_view
from infra.credentials import auth_failed
from infra.gc_tuning import tune_for_serving
from infra.logs import configure_logging
from infra.settings import Settings, get_settings
from infra.web import (
    Handler,
    JSONResponse,
    install_error_handlers,
    query_bool,
    query_int,
    query_seconds,
    read_json,
    read_json_object,
    requires,
    until_client_gone,
)

log = structlog.get_logger(__name__)

MAX_BATCH = 100
#: What an `output` or `error` event of `/api/eval/{id}/events` shows of a live chunk.
LIVE_FIELDS = ("data", "seq", "at_ms", "truncated")
MAX_PAGE = 1000
#: How long `POST /api/eval?wait=true` waits without `wait_timeout` (at most CRUCIBLE_MAX_WAIT_S).
DEFAULT_WAIT_S = 10.0


class Api:
    """The endpoints, sharing one process's services (one Redis pool, one HTTP client)."""

    def __init__(self, services: Services) -> None:
        self.settings = services.settings
        self.store = services.store
        self.streams = services.streams
        self.submitter = services.submitter
        self.canceller = services.canceller
        self.dlq = services.dlq
        self.limiter = services.limiter
        self.executors = services.executors
        self.keys = services.keys
        self.languages = offered_languages(self.settings)

    async def openapi(self, request: Request) -> JSONResponse:
        return JSONResponse(openapi_schema(self.settings, list(self.languages)))

    async def list_languages(self, request: Request) -> JSONResponse:
        try:
            listing = await self.executors.languages()
        except ExecutorUnavailable as exc:
            # executor addresses are for admins only; the log has them
            log.warning("languages.no_executor", error=str(exc))
            raise Unavailable("no executor answered, try again shortly") from None
        return JSONResponse({"languages": listing.get("languages", [])})

    # -- submission ----------------------------------------------------------------------

    def _submitter_key(self, request: Request, wants_priority: bool, chose_id: bool = False) -> ApiKey:
        key = caller(request)
        assert key is not None  # routes for submissions need the `user` scope
        if wants_priority and key.tier not in PRIORITY_TIERS:
            raise Forbidden(
                "priority (the high queue) needs a premium or admin key", field="priority", tier=key.tier
            )
        if chose_id and not key.is_admin:
            # ids are global: a "taken" answer would tell one key about another's evaluations
            raise Forbidden("choosing the eval_id needs an admin key", field="eval_id", tier=key.tier)
        return key

    async def submit(self, request: Request) -> JSONResponse:
        params, most = request.query_params, self.settings.max_wait_s  # `wait_timeout` checked even alone
        wait_s = query_seconds(
            params.get("wait_timeout"), "wait_timeout", default=min(DEFAULT_WAIT_S, most), most=most
        )
        if query_bool(params.get("wait"), "wait"):
            return await self._submit_and_wait(request, wait_s)
        return await self._submit(request)

    async def _submit_and_wait(self, request: Request, wait_s: float) -> JSONResponse:
        """`?wait=true`: the result, as `GET /api/eval/{id}` shows it, if it comes within `wait_s`
        (200); else the queued answer with the status now, `queued` or `running` (202). The wait
        holds one of the key's event-stream places, taken before anything is submitted (all
        taken: 429, nothing submitted), and follows on the process's shared subscription."""
        key = caller(request)
        assert key is not None
        async with self.limiter.stream(key):
            queued = await self._submit(request)
            answer = json_codec.loads(queued.body)  # as without waiting, whatever fields it has
            last = await until_client_gone(request, self.streams.last_within(answer["eval_id"], wait_s))
        headers = {k: v for k, v in queued.headers.items() if k not in ("content-length", "content-type")}
        record = await self.store.get(answer["eval_id"]) if last and last["status"] in TERMINAL else None
        if record is None:
            return JSONResponse({**answer, "status": last["status"] if last else "queued"}, 202, headers)
        view = for_caller(public_view(record), key)
        return JSONResponse({**answer, **view, "message": "Evaluation finished"}, headers=headers)

    async def _submit(self, request: Request) -> JSONResponse:
        body = await read_json_object(request, self.settings.body_timeout_s)
        sub = parse_submission(body, self.settings, self.languages)
        key = self._submitter_key(request, sub.priority, chose_id="eval_id" in body)
        level = sub.level
        accepted = await self.submitter.submit(sub, level, "api", owner=key.id, quota=key)
        allowance = accepted.allowance or self.limiter.unmetered(key)
        return JSONResponse(
            {
                "eval_id": sub.eval_id,
                "task_id": task_id_of(sub.eval_id),
                "status": "queued",
                "message": "Evaluation queued successfully",
                "queue_position": accepted.queue_position,
                "queue_system": accepted.queue_system,
                "fallback": accepted.fallback,
                "warnings": ignored_fields(body),
            },
            headers=allowance.headers(),
        )

    async def submit_batch(self, request: Request) -> JSONResponse:
        body = await read_json_object(request, self.settings.body_timeout_s)
        items = body.get("evaluations")
        if not isinstance(items, list) or not items:
            raise InvalidInput("field 'evaluations' must be a non-empty list", field="evaluations")
        if len(items) > MAX_BATCH:
            raise TooLarge(f"at most {MAX_BATCH} evaluations per batch", field="evaluations")
        not_objects = [i for i, item in enumerate(items) if not isinstance(item, dict)]
        if not_objects:
            raise InvalidInput("each evaluation must be a JSON object", field="evaluations", at=not_objects)
        key = self._submitter_key(request, wants_priority=False)  # batches go to the low queue
        parsed: list[Submission | Refusal] = []
        for item in items:
            try:
                self._submitter_key(request, wants_priority=False, chose_id="eval_id" in item)
                parsed.append(parse_submission(item, self.settings, self.languages))
            except Refusal as exc:
                parsed.append(exc)
        valid = [p for p in parsed if isinstance(p, Submission)]
        allowance = await self.limiter.take(key, [s.eval_id for s in valid]) if valid else None
        results: list[dict[str, Any]] = []
        for index, outcome in enumerate(parsed):
            try:
                if isinstance(outcome, Refusal):
                    raise outcome
                accepted = await self.submitter.submit(
                    outcome, "low", "batch", owner=key.id, quota=key, counted=True
                )
                results.append(
                    {"eval_id": outcome.eval_id, "status": "queued", "queue_system": accepted.queue_system,
                     "warnings": ignored_fields(items[index])}
                )  # fmt: skip
            except Refusal as exc:
                results.append({"index": index, "status": "failed", "error": exc.message, **exc.details})
        queued = sum(r["status"] == "queued" for r in results)
        return JSONResponse(
            {"evaluations": results, "total": len(items), "queued": queued, "failed": len(items) - queued},
            headers=allowance.headers() if allowance else {},
        )

    # -- reading ---------------------------------------------------------------------------

    async def visible(self, request: Request) -> dict[str, Any]:
        """The path's evaluation if the caller may see it: its own, or any for admin keys.

        Someone else's is "not found", exactly like one that does not exist. Each look costs
        the caller one read (its read rate limit).
        """
        eval_id = request.path_params["eval_id"]
        key = caller(request)
        if key is not None:
            await self.limiter.take_reads(key)
        record = await self.store.get(eval_id) if EVAL_ID_PATTERN.match(eval_id) else None
        if record is None or key is None or not (key.is_admin or record.get("owner") == key.id):
            raise NotFound("evaluation not found", eval_id=eval_id)
        return record

    async def get_evaluation(self, request: Request) -> JSONResponse:
        return JSONResponse(for_caller(public_view(await self.visible(request)), caller(request)))

    async def follow_evaluation(self, request: Request) -> StreamingResponse:
        """Server-sent events: one `status` event per change, closing after the final one; while
        it runs, `output` and `error` events with chunks of what the program writes (`data`,
        `seq`, `at_ms`, and `truncated` on the last when it wrote past the stored cap)."""
        eval_id = (await self.visible(request))["id"]
        key = caller(request)
        assert key is not None
        place = contextlib.AsyncExitStack()
        await place.enter_async_context(self.limiter.stream(key))  # 429 when the key has too many

        def sse(event: dict[str, Any]) -> str:
            if is_live(event):
                chunk = {name: event[name] for name in LIVE_FIELDS if name in event}
                return f"event: {event['type']}\ndata: {json.dumps(for_caller(chunk, key))}\n\n"
            return f"event: status\ndata: {json.dumps(for_caller(event, key))}\n\n"

        async def stream() -> AsyncIterator[str]:
            async with place:
                async for event in self.streams.follow(eval_id, live=True):
                    yield ": keep-alive\n\n" if event is None else sse(event)

        return StreamingResponse(
            stream(), media_type="text/event-stream", headers={"cache-control": "no-cache"}
        )

    async def cancel(self, request: Request) -> JSONResponse:
        eval_id = (await self.visible(request))["id"]
        terminate = query_bool(request.query_params.get("terminate"), "terminate")
        outcome = await self.canceller.cancel(eval_id, terminate)
        if outcome is None:
            raise NotFound("evaluation not found", eval_id=eval_id)
        if not outcome.cancelled:
            raise Refused(outcome.message, **outcome.to_dict())
        return JSONResponse({"eval_id": eval_id, "status": "cancelled", **outcome.to_dict()})

    # -- webhooks ----------------------------------------------------------------------------

    async def webhook_secret(self, request: Request) -> JSONResponse:
        """The secret the caller's webhooks are signed with (made on first ask), to verify them."""
        key = caller(request)
        assert key is not None
        return JSONResponse({"key_id": key.id, "secret": await self.keys.webhook_secret(key.id)})

    async def rotate_webhook_secret(self, request: Request) -> JSONResponse:
        """A new secret for the caller's webhooks: deliveries signed from now on use it."""
        key = caller(request)
        assert key is not None
        return JSONResponse({"key_id": key.id, "secret": await self.keys.rotate_webhook_secret(key.id)})

    # -- dead-letter queue -------------------------------------------------------------------

    async def dlq_list(self, request: Request) -> JSONResponse:
        params = request.query_params
        limit = query_int(params.get("limit"), "limit", default=100, low=1, high=MAX_PAGE)
        offset = query_int(params.get("offset"), "offset", default=0, low=0, high=10**9)
        entries = await self.dlq.list_tasks(limit, offset, params.get("eval_id") or None)
        tasks = [public_entry(e) for e in entries]
        total = await self.dlq.get_queue_size()
        return JSONResponse(
            {"tasks": tasks, "count": len(tasks), "total": total, "limit": limit, "offset": offset}
        )

    async def dlq_statistics(self, request: Request) -> JSONResponse:
        return JSONResponse(await self.dlq.get_statistics())

    async def dlq_get(self, request: Request) -> JSONResponse:
        task_id = request.path_params["task_id"]
        entry = await self.dlq.get_task(task_id)
        if entry is None:
            raise NotFound("Task not found in DLQ", task_id=task_id)
        return JSONResponse(public_entry(entry))

    async def _retry_one(self, task_id: str) -> None:
        try:
            await self.dlq.retry_task(task_id)
        except NotInDLQ:
            raise NotFound("Task not found in DLQ", task_id=task_id) from None
        except NotRetryable as exc:
            raise Conflict(str(exc), task_id=task_id) from None

    async def dlq_retry(self, request: Request) -> JSONResponse:
        task_id = request.path_params["task_id"]
        await self._retry_one(task_id)
        return JSONResponse({"status": "success", "message": f"Task {task_id} re-queued", "task_id": task_id})

    async def dlq_delete(self, request: Request) -> JSONResponse:
        task_id = request.path_params["task_id"]
        if not await self.dlq.remove_task(task_id):
            raise NotFound("Task not found in DLQ", task_id=task_id)
        return JSONResponse({"status": "success", "message": f"Task {task_id} removed", "task_id": task_id})

    async def dlq_retry_batch(self, request: Request) -> JSONResponse:
        ids = await read_json(request, self.settings.body_timeout_s)
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise InvalidInput("body must be a JSON list of task ids")
        if len(ids) > MAX_BATCH:  # as POST /api/eval-batch's limit
            raise TooLarge(f"at most {MAX_BATCH} task ids per batch", count=len(ids))
        succeeded: list[str] = []
        failed: list[dict[str, str]] = []
        for task_id in ids:
            try:
                await self._retry_one(task_id)
                succeeded.append(task_id)
            except Refusal as exc:
                failed.append({"task_id": task_id, "error": exc.message})
        return JSONResponse(
            {
                "total": len(ids),
                "succeeded": len(succeeded),
                "failed": len(failed),
                "results": {"succeeded": succeeded, "failed": failed},
            }
        )

    async def list_evaluations(self, request: Request) -> JSONResponse:
        params = request.query_params
        limit = query_int(params.get("limit"), "limit", default=50, low=1, high=MAX_PAGE)
        offset = query_int(params.get("offset"), "offset", default=0, low=0, high=10**9)
        status = params.get("status")
        if status is not None and status not in STATUSES:
            raise InvalidInput(f"unknown status {status!r}", field="status", known=list(STATUSES))
        key = caller(request)
        assert key is not None
        await self.limiter.take_reads(key, rows=limit)
        queue = params.get("queue")
        if queue is not None and queue not in LEVELS:
            raise InvalidInput(f"unknown queue {queue!r}", field="queue", known=list(LEVELS))
        records, total = await self.store.list(
            limit=limit,
            offset=offset,
            status=status,
            language=params.get("language") or None,
            queue=queue,
            search=params.get("q") or None,
            owner=None if key.is_admin else key.id,  # a key lists its own; admin lists all
        )
        rows = [
            {
                "eval_id": r["id"],
                "status": r["status"],
                "created_at": r["created_at"],
                "language": r["language"],
                "queue": r["queue"],
                "queue_system": r["queue_system"] or "dramatiq",
                "code_preview": r["code_preview"] or "",
                "success": r["status"] == "completed",
            }
            for r in records
        ]
        return JSONResponse(
            {
                "evaluations": rows,
                "count": len(rows),
                "total": total,
                "limit": limit,
                "offset": offset,
                "has_more": offset + len(rows) < total,
                "statuses": list(STATUSES),
                "languages": list(self.languages),
            }
        )

    async def timeline(self, request: Request) -> JSONResponse:
        """Every status change of one evaluation, oldest first (retries, times; workers for admins)."""
        eval_id = (await self.visible(request))["id"]
        key = caller(request)
        events = [for_caller(event, key) for event in await self.store.events(eval_id)]
        return JSONResponse({"eval_id": eval_id, "events": events})


def create_dashboard_app() -> Starlette:
    """The same app for the dashboard's own port, where `/` opens the dashboard."""
    return create_app(extra_routes=[root_redirect()])


def create_app(settings: Settings | None = None, extra_routes: Sequence[BaseRoute] = ()) -> Starlette:
    settings = settings or get_settings()
    configure_logging(settings.log_level, settings.log_format)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        services = Services.build(settings)
        keys.set(services.keys)
        api.set(Api(services))
        ops.set(OpsApi(services))
        route = services.legacy_route
        tracker = None
        if route:
            tracker = asyncio.create_task(MigrationTracker(services.store, route, services.submitter).run())
        tune_for_serving()
        try:
            yield
        finally:
            if tracker:
                tracker.cancel()
            api.set(None)
            ops.set(None)
            await services.close()

    # The endpoints' objects are built in the lifespan (they need the loop); each route names
    # the method it runs. Every route needs a live API key ("user") unless it says otherwise.
    api: Handler[Api] = Handler()
    keys: Handler[KeyStore] = Handler()
    ops: Handler[OpsApi] = Handler()
    user, admin, metrics, anyone = requires("user"), requires("admin"), requires("metrics"), requires(None)
    app = Starlette(
        routes=[
            Route("/openapi.json", user(api.endpoint(Api.openapi))),
            Route("/api/languages", user(api.endpoint(Api.list_languages))),
            Route("/api/eval", user(api.endpoint(Api.submit)), methods=["POST"]),
            Route("/api/eval-batch", user(api.endpoint(Api.submit_batch)), methods=["POST"]),
            Route("/api/eval/{eval_id}", user(api.endpoint(Api.get_evaluation))),
            Route("/api/eval-status/{eval_id}", user(api.endpoint(Api.get_evaluation))),
            Route("/api/eval/{eval_id}/events", user(api.endpoint(Api.follow_evaluation))),
            Route("/api/eval/{eval_id}/timeline", user(api.endpoint(Api.timeline))),
            Route("/api/eval/{eval_id}/cancel", user(api.endpoint(Api.cancel)), methods=["POST"]),
            Route("/api/evaluations", user(api.endpoint(Api.list_evaluations))),
            Route("/api/webhook-secret", user(api.endpoint(Api.webhook_secret))),
            Route(
                "/api/webhook-secret/rotate", user(api.endpoint(Api.rotate_webhook_secret)), methods=["POST"]
            ),
            Route("/api/dlq/tasks", admin(api.endpoint(Api.dlq_list))),
            Route("/api/dlq/statistics", admin(api.endpoint(Api.dlq_statistics))),
            Route(
                "/api/dlq/tasks/retry-batch",
                admin(api.endpoint(Api.dlq_retry_batch)),
                methods=["POST"],
            ),
            Route("/api/dlq/tasks/{task_id}", admin(api.endpoint(Api.dlq_get))),
            Route("/api/dlq/tasks/{task_id}", admin(api.endpoint(Api.dlq_delete)), methods=["DELETE"]),
            Route(
                "/api/dlq/tasks/{task_id}/retry",
                admin(api.endpoint(Api.dlq_retry)),
                methods=["POST"],
            ),
            Route("/api/migration-status", admin(ops.endpoint(OpsApi.migration_status))),
            Route("/api/migration", admin(ops.endpoint(OpsApi.change_migration)), methods=["PUT"]),
            Route("/api/celery-status", admin(ops.endpoint(OpsApi.celery_status))),
            Route("/api/queue-status", admin(ops.endpoint(OpsApi.queue_status))),
            Route("/metrics", metrics(ops.endpoint(OpsApi.metrics))),
            Route("/api/rates", admin(ops.endpoint(OpsApi.rates))),
            *dashboard_routes(),
            *extra_routes,
            Route("/health", anyone(ops.endpoint(OpsApi.health))),
            Route("/api/health", user(ops.endpoint(OpsApi.health))),
        ],
        lifespan=lifespan,
        middleware=[
            Middleware(AuthenticationMiddleware, backend=ApiKeyBackend(settings, keys), on_error=auth_failed)
        ],
    )
    install_error_handlers(app)
    return app
