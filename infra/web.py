"""The HTTP edge shared by the API and the executor: errors as `{"error": ..., "details": {...}}`,
each domain exception mapped to its status code here and nowhere else, JSON bodies read with
limits, and the scope an endpoint needs declared where its route is."""

from __future__ import annotations

import asyncio
import functools
import math
import re
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Generic, TypeVar

import orjson
import structlog
from redis.exceptions import ConnectionError as RedisError
from redis.exceptions import OutOfMemoryError
from starlette import responses
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from evaluations import errors, json_codec
from evaluations.validation import bool_word

log = structlog.get_logger(__name__)

T = TypeVar("T")

#: The status code of each kind of refusal (a subclass answers as its nearest listed base).
HTTP_STATUS: dict[type[errors.CrucibleError], int] = {
    errors.MalformedInput: 422,  # a body that does not parse as JSON: 422, as the original answered
    errors.Refused: 400,
    errors.TimedOut: 408,
    errors.Unauthenticated: 401,
    errors.Forbidden: 403,
    errors.NotFound: 404,
    errors.Conflict: 409,
    errors.TooLarge: 413,
    errors.UnsupportedMediaType: 415,
    errors.InvalidInput: 422,
    errors.LimitExceeded: 429,
    errors.Unavailable: 503,
    errors.Busy: 503,
}

#: Largest request body read at all; bigger bodies are refused before parsing.
MAX_BODY_BYTES = 2 * 1024 * 1024
#: What the executor reads from a worker: what the API took, written again as JSON, where a
#: control character of a file or an input may take 6 bytes ("\\u0001") for the 1 it was.
EXECUTOR_MAX_BODY_BYTES = 6 * MAX_BODY_BYTES


def status_of(exc: errors.CrucibleError) -> int:
    """The HTTP status code that answers `exc`."""
    for kind in type(exc).__mro__:
        if kind in HTTP_STATUS:
            return HTTP_STATUS[kind]
    return 400


class JSONResponse(responses.JSONResponse):
    """Starlette's JSON response, rendered by orjson (the same compact UTF-8 JSON)."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_NON_STR_KEYS)


def error_response(status: int, error: str, **details: object) -> JSONResponse:
    return JSONResponse({"error": error, "details": details}, status_code=status)


def error_body(exc: errors.CrucibleError) -> dict[str, Any]:
    """The `{"error", "details"}` body of a refusal (also one item of a batch's answer)."""
    return {"error": exc.message, "details": exc.details}


async def _refused(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, errors.CrucibleError)
    if isinstance(exc, errors.Unavailable):
        log.warning("request.dependency_unavailable", path=request.url.path, error=str(exc))
        response = error_response(503, exc.message, path=request.url.path, **exc.details)
    else:
        response = error_response(status_of(exc), exc.message, **exc.details)
    response.headers.update(exc.headers)
    return response


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    return error_response(exc.status_code, str(exc.detail), path=request.url.path)


#: How long a caller is told to wait when Redis does not answer (it usually returns within seconds).
REDIS_DOWN_RETRY_AFTER_S = 5


async def _redis_down(request: Request, exc: Exception) -> JSONResponse:
    log.warning("request.redis_unavailable", path=request.url.path, error=str(exc))
    response = error_response(
        503, "storage unavailable (Redis does not answer), try again shortly", path=request.url.path,
        reason="storage_unavailable", retry_after=REDIS_DOWN_RETRY_AFTER_S,
    )  # fmt: skip
    response.headers["Retry-After"] = str(REDIS_DOWN_RETRY_AFTER_S)
    return response


async def _redis_full(request: Request, exc: Exception) -> JSONResponse:
    log.warning("request.redis_full", path=request.url.path, error=str(exc))
    response = error_response(
        503, "storage full (Redis refuses writes at its maxmemory), try again later", path=request.url.path,
        reason="storage_full", retry_after=60,
    )  # fmt: skip
    response.headers["Retry-After"] = "60"
    return response


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("request.failed", path=request.url.path)
    return error_response(500, "internal error", path=request.url.path)


def install_error_handlers(app: Starlette) -> None:
    app.add_exception_handler(errors.CrucibleError, _refused)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RedisError, _redis_down)
    app.add_exception_handler(OutOfMemoryError, _redis_full)
    app.add_exception_handler(Exception, _unexpected)


Endpoint = Callable[[Request], Awaitable[Response]]
#: The scope a caller proves with EXECUTOR_SECRET (workers and the API, calling an executor).
EXECUTOR_SCOPE = "executor"


def requires(scope: str | None) -> Callable[[Endpoint], Endpoint]:
    """An endpoint for callers holding `scope` ("user": any live key, "admin", "metrics",
    "executor"; None: anyone): 401 without credentials, 403 with the wrong ones."""

    def decorate(endpoint: Endpoint) -> Endpoint:
        if scope is None:
            return endpoint

        @functools.wraps(endpoint)
        async def guarded(request: Request) -> Response:
            if scope not in request.auth.scopes:
                if not request.user.is_authenticated:
                    raise errors.Unauthenticated(
                        "the executor's secret is required (Authorization: Bearer <EXECUTOR_SECRET>)"
                        if scope == EXECUTOR_SCOPE
                        else "an API key is required (Authorization: Bearer <key> or X-API-Key)"
                    )
                raise errors.Forbidden(f"this needs an {scope} key", needs=scope)
            return await endpoint(request)

        return guarded

    return decorate


async def read_json(request: Request, timeout_s: float, max_bytes: int = MAX_BODY_BYTES) -> Any:
    """The body parsed as JSON, or a 4xx saying why not (a declared non-JSON type: 415; not all
    in within `timeout_s`, `CRUCIBLE_BODY_TIMEOUT_S`: 408; over `max_bytes`: 413; a body, with a
    JSON type or none, that does not parse as JSON: 422 `request body is not valid JSON`, the
    parser's words under `details.reason`)."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type and media_type != "application/json" and not media_type.endswith("+json"):
        raise errors.UnsupportedMediaType("request body must be JSON (Content-Type: application/json)")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise errors.TooLarge(f"request body over {max_bytes} bytes")
    body = bytearray()
    try:
        async with asyncio.timeout(timeout_s):  # a client sending its body slowly holds a connection
            async for chunk in request.stream():
                body += chunk
                if len(body) > max_bytes:
                    raise errors.TooLarge(f"request body over {max_bytes} bytes")
    except TimeoutError:
        raise errors.TimedOut(f"request body not received within {timeout_s:g} s") from None
    try:
        return json_codec.loads(body)
    except json_codec.JSONDecodeError as exc:  # also deep nesting, invalid UTF-8, lone surrogates
        raise errors.MalformedInput("request body is not valid JSON", reason=str(exc)[:200]) from None


async def read_json_object(
    request: Request, timeout_s: float, max_bytes: int = MAX_BODY_BYTES
) -> dict[str, Any]:
    """The body as a JSON object, or a 4xx saying why not."""
    data = await read_json(request, timeout_s, max_bytes)
    if not isinstance(data, dict):
        raise errors.InvalidInput("request body must be a JSON object")
    return data


class Handler(Generic[T]):
    """The object whose methods answer a set of routes, built only in the app's lifespan (it
    needs the event loop). Routes bind to its methods where they are declared, by the function
    itself (`Route("/x", handler.endpoint(Api.x))`), so each route names the code it runs."""

    def __init__(self) -> None:
        self._instance: T | None = None

    def set(self, instance: T | None) -> None:
        self._instance = instance

    @property
    def instance(self) -> T:
        assert self._instance is not None, "the app's lifespan has not built its handlers yet"
        return self._instance

    def endpoint(self, method: Callable[[T, Request], Awaitable[Response]]) -> Endpoint:
        async def endpoint(request: Request) -> Response:
            return await method(self.instance, request)

        endpoint.__name__ = method.__name__
        endpoint.__doc__ = method.__doc__
        return endpoint


def query_bool(raw: str | None, name: str) -> bool:
    """A query parameter that is a flag. Absent: False; present, it must say true or false."""
    if raw is None:
        return False
    value = bool_word(raw)
    if value is None:
        raise errors.InvalidInput(f"query parameter '{name}' must be true or false", field=name)
    return value


def query_int(raw: str | None, name: str, *, default: int, low: int, high: int) -> int:
    """Absent: `default`. Present, plain decimal digits within [low, high] (no sign, no `_`)."""
    if raw is None:
        return default
    if not raw.isascii() or not raw.isdigit():
        raise errors.InvalidInput(f"query parameter '{name}' must be a whole number", field=name)
    value = int(raw)
    if not low <= value <= high:
        raise errors.InvalidInput(f"query parameter '{name}' must be between {low} and {high}", field=name)
    return value


#: A number as a query parameter: plain decimal, with a fraction or an exponent (`0.5`, `2`, `1e-3`).
DECIMAL = re.compile(r"(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")


def query_seconds(raw: str | None, name: str, *, default: float, most: float) -> float:
    """Absent: `default`. Present, a number of seconds more than 0 and at most `most`."""
    if raw is None:
        return default
    value = float(raw) if raw.isascii() and DECIMAL.fullmatch(raw) else math.nan
    if math.isnan(value):
        raise errors.InvalidInput(f"query parameter '{name}' must be a number of seconds", field=name)
    if not 0 < value <= most:
        raise errors.InvalidInput(
            f"query parameter '{name}' must be more than 0 and at most {most:g}", field=name, most=most
        )
    return value


async def until_client_gone(request: Request, work: Coroutine[Any, Any, T]) -> T | None:
    """`work`'s result, or None when the client of `request` (its body read already) goes away
    first: `work` is cancelled then, so nothing it holds outlives the request. (A handler is not
    cancelled when its client leaves; it would hold on until `work` ended by itself.)"""

    async def gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass  # after the body, a server sends nothing but the disconnect

    working, leaving = asyncio.ensure_future(work), asyncio.ensure_future(gone())
    try:
        await asyncio.wait((working, leaving), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (working, leaving):
            task.cancel()
        await asyncio.gather(working, leaving, return_exceptions=True)
    return None if working.cancelled() else working.result()
