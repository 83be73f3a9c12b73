"""Small helpers the end-to-end tests share."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import httpx
import redis.asyncio as aioredis

from evaluations.api_keys import KeyStore
from evaluations.status import TERMINAL as STORE_TERMINAL

TERMINAL = set(STORE_TERMINAL)

#: Every process the tests start inherits these (tests/conftest.py puts them in the environment):
#: an admin key the API accepts without storing it, and the executor's shared secret.
TEST_ADMIN_KEY = "cru_testadmin_" + uuid.uuid4().hex
EXECUTOR_SECRET = "crucible-test-secret-" + uuid.uuid4().hex
METRICS_TOKEN = "crucible-test-scrape-" + uuid.uuid4().hex


def api_client(url: str, key: str | None = TEST_ADMIN_KEY, **options: Any) -> httpx.AsyncClient:
    """A client of an API, sending `key` (the test admin key unless told otherwise)."""
    headers = {"x-api-key": key} if key else {}
    return httpx.AsyncClient(base_url=url, timeout=30, headers=headers, **options)


def executor_client(url: str, **options: Any) -> httpx.AsyncClient:
    """A client of an executor, holding its shared secret (as workers do)."""
    return httpx.AsyncClient(
        base_url=url, timeout=60, headers={"authorization": f"Bearer {EXECUTOR_SECRET}"}, **options
    )


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


async def make_keys(client: aioredis.Redis, namespace: str, *tiers: str) -> list[str]:
    """New API keys of these tiers in `namespace`; their secrets, in order."""
    store = KeyStore(client, namespace)
    return [(await store.create(f"{tier}-{n}", tier))[1] for n, tier in enumerate(tiers)]
