"""The floor of what an API can do here: a bare Starlette endpoint that only pushes the request
body to a Redis list, served by uvicorn exactly as `crucible api` is served (for bench/api.py).

    BENCH_REDIS_URL=redis://... uvicorn --factory bench.bare_endpoint:create_app
"""

from __future__ import annotations

import os

import redis.asyncio as aioredis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route


def create_app() -> Starlette:
    # redis-py's plain pool, with room for any number of clients the bench sends (its default
    # 100 refuses past that; its waiting pool would cost this floor a timer per command)
    client = aioredis.Redis.from_url(os.environ["BENCH_REDIS_URL"], max_connections=10_000)
    key = f"{os.environ['BENCH_NAMESPACE']}:bare"

    async def push(request: Request) -> JSONResponse:
        await client.rpush(key, await request.body())
        return JSONResponse({"queued": True}, status_code=202)

    return Starlette(routes=[Route("/push", push, methods=["POST"])])
