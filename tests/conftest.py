"""Fixtures: a real Redis (embedded Valkey unless REDIS_URL is set) and real stack processes.

Each test session works in its own key namespace, so it can share a Redis with anything
else (such as the machine's Redis 7) and cleans up after itself.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack
from dataclasses import dataclass

import httpx
import pytest
import redis.asyncio as aioredis

from bench.stack import delete_namespace, free_port, free_uid_base, process, redis_server, wait_http
from tests.helpers import EXECUTOR_SECRET, METRICS_TOKEN, TEST_ADMIN_KEY, api_client, executor_client

# Inherited by every process the tests start (API, workers, executors, `crucible up`).
os.environ["EXECUTOR_SECRET"] = EXECUTOR_SECRET
os.environ["CRUCIBLE_ADMIN_KEY"] = TEST_ADMIN_KEY
os.environ["CRUCIBLE_METRICS_TOKEN"] = METRICS_TOKEN


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    with redis_server() as url:
        yield url


@pytest.fixture
def namespace(redis_url: str) -> Iterator[str]:
    """A fresh key namespace for one test."""
    ns = f"crucible-test-{uuid.uuid4().hex[:8]}"
    yield ns
    delete_namespace(redis_url, ns)


@dataclass
class ExecutorService:
    url: str
    pid: int
    #: the sandbox uids its slots run as (held by it alone on this host)
    uids: range


@pytest.fixture(scope="session")
def executor_service() -> Iterator[ExecutorService]:
    port = free_port()
    # The executor's secret doubles as one planted in its environment: no sandboxed program may
    # ever see it (tests/e2e/test_attacks.py looks).
    base = free_uid_base()
    env = {"EXECUTOR_PORT": str(port), "LOG_FORMAT": "json", "CRUCIBLE_TEST_SECRET": EXECUTOR_SECRET,
           "SANDBOX_UID_BASE": str(base)}  # fmt: skip
    with process("executor", "executor", env) as proc:
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/health")
        capacity = httpx.get(f"{url}/health").json()["capacity"]
        yield ExecutorService(url, proc.pid, range(base, base + capacity))


@pytest.fixture(scope="session")
def executor_url(executor_service: ExecutorService) -> str:
    return executor_service.url


@pytest.fixture
async def executor(executor_url: str) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the session's executor service."""
    async with executor_client(executor_url) as client:
        yield client


@dataclass
class Stack:
    """A running API and worker pool sharing one namespace."""

    api_url: str
    namespace: str
    env: dict[str, str]


def stack_env(redis_url: str, namespace: str, executor_url: str, **extra: str) -> dict[str, str]:
    return {
        "REDIS_URL": redis_url,
        "CRUCIBLE_NAMESPACE": namespace,
        "EXECUTOR_SERVICE_URL": executor_url,
        "LOG_FORMAT": "json",
        **extra,
    }


def start_stack(stack: ExitStack, name: str, env: dict[str, str]) -> Stack:
    """An API and Dramatiq workers."""
    api = start_api(stack, name, env)
    stack.enter_context(process(f"{name}-worker", "worker", api.env))
    return api


def start_api(stack: ExitStack, name: str, env: dict[str, str], healthy: bool = True) -> Stack:
    """An API alone (no workers); `healthy=False` waits only for it to answer at all."""
    port = free_port()
    env = {**env, "CRUCIBLE_API_PORT": str(port)}
    stack.enter_context(process(f"{name}-api", "api", env))
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/health", healthy=healthy)
    return Stack(url, env["CRUCIBLE_NAMESPACE"], env)


@pytest.fixture(scope="session")
def shared_stack(redis_url: str, executor_url: str) -> Iterator[Stack]:
    """API + 2 worker processes x 4 threads, shared by the end-to-end tests."""
    ns = f"crucible-test-{uuid.uuid4().hex[:8]}"
    with ExitStack() as stack:
        yield start_stack(stack, "shared", stack_env(redis_url, ns, executor_url))
    delete_namespace(redis_url, ns)


@pytest.fixture
async def api(shared_stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(shared_stack.api_url) as client:
        yield client


@pytest.fixture
async def aredis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    await client.aclose()
