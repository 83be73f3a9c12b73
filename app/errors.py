"""One shape for every error the HTTP services return: `{"error": ..., "details": {...}}`."""

from __future__ import annotations

import structlog
from redis.exceptions import ConnectionError as RedisError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request

from app.json_codec import JSONResponse

log = structlog.get_logger(__name__)


class RequestError(Exception):
    """A request the service refuses; becomes a 4xx JSON response naming the problem."""

    def __init__(
        self, status: int, error: str, headers: dict[str, str] | None = None, **details: object
    ) -> None:
        super().__init__(error)
        self.status = status
        self.message = error
        self.headers = headers or {}
        self.details = details


class Unavailable(Exception):
    """A service this one depends on cannot be reached; becomes a 503 naming it."""


def error_response(status: int, error: str, **details: object) -> JSONResponse:
    return JSONResponse({"error": error, "details": details}, status_code=status)


async def _request_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestError)
    response = error_response(exc.status, exc.message, **exc.details)
    response.headers.update(exc.headers)
    return response


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    return error_response(exc.status_code, str(exc.detail), path=request.url.path)


async def _redis_down(request: Request, exc: Exception) -> JSONResponse:
    log.warning("request.redis_unavailable", path=request.url.path, error=str(exc))
    return error_response(503, "storage unavailable, try again shortly", path=request.url.path)


async def _unavailable(request: Request, exc: Exception) -> JSONResponse:
    log.warning("request.dependency_unavailable", path=request.url.path, error=str(exc))
    return error_response(503, str(exc), path=request.url.path)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("request.failed", path=request.url.path)
    return error_response(500, "internal error", path=request.url.path)


def install_error_handlers(app: Starlette) -> None:
    app.add_exception_handler(RequestError, _request_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RedisError, _redis_down)
    app.add_exception_handler(Unavailable, _unavailable)
    app.add_exception_handler(Exception, _unexpected)
