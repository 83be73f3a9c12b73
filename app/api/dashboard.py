"""The operators' dashboard: one static page that polls the API's JSON endpoints.

Mounted under the API at `/dashboard`; `crucible dashboard` serves the same app on
`DASHBOARD_PORT` (5555, Flower's port) with `/` leading to it. No build step, no CDN: the
page, its script and its style ship in `app/api/static`.
"""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, RedirectResponse
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"


async def page(request: Request) -> FileResponse:
    return FileResponse(STATIC / "dashboard.html", headers={"cache-control": "no-cache"})


async def to_dashboard(request: Request) -> RedirectResponse:
    return RedirectResponse("/dashboard")


def dashboard_routes() -> list[BaseRoute]:
    return [
        Route("/dashboard", page),
        Mount("/dashboard/static", StaticFiles(directory=STATIC), name="dashboard-static"),
    ]


def root_redirect() -> Route:
    """For the dashboard's own port: `/` opens the dashboard."""
    return Route("/", to_dashboard)
