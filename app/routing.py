"""Routes whose handler object is built in the app's lifespan (it needs the event loop)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import Response


def delegate(service: str, method: str) -> Callable[[Request], Awaitable[Response]]:
    """An endpoint that calls `request.app.state.<service>.<method>(request)`."""

    async def endpoint(request: Request) -> Response:
        return await getattr(getattr(request.app.state, service), method)(request)

    endpoint.__name__ = method
    return endpoint
