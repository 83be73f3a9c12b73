"""Small helpers the end-to-end tests share."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import httpx

from app.store import TERMINAL as STORE_TERMINAL

TERMINAL = set(STORE_TERMINAL)


async def submit(api: httpx.AsyncClient, code: str, **fields: Any) -> str:
    response = await api.post("/api/eval", json={"code": code, **fields})
    assert response.status_code == 200, response.text
    return response.json()["eval_id"]


async def wait_final(api: httpx.AsyncClient, eval_id: str, seconds: float = 60) -> dict[str, Any]:
    """Poll until the evaluation reaches a terminal status."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        response = await api.get(f"/api/eval/{eval_id}")
        assert response.status_code == 200, response.text
        body = response.json()
        if body["status"] in TERMINAL:
            return body
        await asyncio.sleep(0.05)
    raise AssertionError(f"{eval_id} not finished after {seconds}s: {body}")


async def execute(executor: httpx.AsyncClient, code: str, **fields: Any) -> dict[str, Any]:
    """Run code straight on an executor (`POST /execute`); fields override the defaults."""
    body = {"eval_id": f"t-{uuid.uuid4().hex[:8]}", "code": code, "language": "python", "timeout": 10}
    response = await executor.post("/execute", json={**body, **fields})
    assert response.status_code == 200, response.text
    return response.json()
