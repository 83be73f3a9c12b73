"""Routes whose handler object is built in the app's lifespan (it needs the event loop)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import Response

from app.errors import RequestError


def delegate(
    service: str, method: str, scope: str | None = "user"
) -> Callable[[Request], Awaitable[Response]]:
    """An endpoint that calls `request.app.state.<service>.<method>(request)`, for callers
    holding `scope` ("user": any live key, "admin", "metrics"; None: anyone)."""

    async def endpoint(request: Request) -> Response:
        if scope is not None and scope not in request.auth.scopes:
            if not request.user.is_authenticated:
                raise RequestError(401, "an API key is required (Authorization: Bearer <key> or X-API-Key)")
            raise RequestError(403, f"this needs an {scope} key", needs=scope)
        return await getattr(getattr(request.app.state, service), method)(request)

    endpoint.__name__ = method
    return endpoint
