"""Workers spread runs over healthy executors and report status changes to a storage service."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import ExitStack
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import dramatiq
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from dramatiq import Worker
from dramatiq.brokers.stub import StubBroker
from dramatiq.middleware import AsyncIO

from actors.executor_client import ExecutorConnectionLost, ExecutorPool, answer_timeout
from actors.runtime import CloseRuntime, WorkerRuntime
from bench.stack import free_port
from evaluations.languages import COMPILE_TIMEOUT_SECONDS
from infra.settings import Settings
from middleware.retry_policy import policy_for
from tests.conftest import stack_env, start_stack
from tests.helpers import api_client, submit, wait_final


class StorageService:
    """A stand-in storage service on loopback that records every PUT it receives."""

    def __init__(self) -> None:
        self.received: list[tuple[str, dict]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_PUT(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                outer.received.append((self.path, body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def statuses(self, eval_id: str) -> list[str]:
        return [body["status"] for path, body in self.received if path == f"/evaluations/{eval_id}"]


@pytest.fixture
def storage() -> Iterator[StorageService]:
    service = StorageService()
    yield service
    service.server.shutdown()


async def test_down_executor_is_skipped_and_status_changes_are_forwarded(
    redis_url: str, executor_url: str, namespace: str, storage: StorageService
) -> None:
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    env = stack_env(
        redis_url,
        namespace,
        f"{down},{executor_url}",
        STORAGE_SERVICE_URL=storage.url,
        CELERY_CONCURRENCY="1",
    )
    with ExitStack() as stack:
        s = start_stack(stack, "executors", env)
        async with api_client(s.api_url) as api:
            ids = [await submit(api, f"print({n})") for n in range(6)]
            results = [await wait_final(api, i) for i in ids]
    assert [r["status"] for r in results] == ["completed"] * 6
    assert {r["executor"] for r in results} == {executor_url}
    assert all(r["retries"] == 0 for r in results)
    for eval_id in ids:
        assert storage.statuses(eval_id) == ["queued", "running", "completed"]
    final = next(body for path, body in storage.received if body["status"] == "completed")
    assert final["output"] in {f"{n}\n" for n in range(6)}


async def test_runs_wait_for_a_free_executor_slot(redis_url: str, namespace: str) -> None:
    from bench.stack import process, wait_http

    port = free_port()
    executor_url = f"http://127.0.0.1:{port}"
    with ExitStack() as stack:
        stack.enter_context(
            process("executor-busy", "executor", {"EXECUTOR_PORT": str(port), "EXECUTOR_CONCURRENCY": "1"})
        )
        wait_http(f"{executor_url}/health")
        s = start_stack(stack, "busy", stack_env(redis_url, namespace, executor_url, CELERY_CONCURRENCY="1"))
        async with api_client(s.api_url) as api:
            ids = [await submit(api, f"import time; time.sleep(0.3); print({n})") for n in range(4)]
            results = [await wait_final(api, i) for i in ids]
    assert [r["output"] for r in results] == [f"{n}\n" for n in range(4)]
    assert all(r["retries"] == 0 for r in results)


def test_a_worker_waits_for_the_compile_step_and_the_run() -> None:
    """A worker giving up during a slow compile would only have the run started again."""
    assert answer_timeout(10).total > 10 + COMPILE_TIMEOUT_SECONDS


@contextlib.asynccontextmanager
async def fake_executor(
    execute: Callable[[web.Request], Awaitable[web.StreamResponse]],
) -> AsyncIterator[tuple[str, list[web.Request]]]:
    """An executor on loopback whose `/execute` is `execute`; yields its URL and the kills it got."""
    kills: list[web.Request] = []

    async def kill(request: web.Request) -> web.Response:
        kills.append(request)
        return web.json_response({"killed": True})

    app = web.Application()
    app.add_routes([web.post("/execute", execute), web.post("/kill/{eval_id}", kill)])
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/"), kills
    finally:
        await server.close()


async def test_a_lost_answer_stops_the_attempt_and_is_retried_as_a_network_error() -> None:
    """The run may be going on there: it is stopped before the worker gives up on it."""

    async def hang_up(request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        request.transport.close()
        return web.Response()

    async with fake_executor(hang_up) as (url, kills):
        pool = ExecutorPool((url,))
        with pytest.raises(ExecutorConnectionLost) as lost:
            await pool.execute({"eval_id": "e1", "timeout": 5})
        await pool.close()
    assert policy_for(lost.value) == "network_error"
    assert [(k.match_info["eval_id"], k.query.get("attempt_only")) for k in kills] == [("e1", "true")]


async def test_a_refused_connection_moves_on_to_the_next_executor() -> None:
    async def answer(request: web.Request) -> web.Response:
        return web.json_response({"status": "completed", "eval_id": (await request.json())["eval_id"]})

    refusing = f"http://127.0.0.1:{free_port()}"
    async with fake_executor(answer) as (url, _):
        pool = ExecutorPool((refusing, url))
        results = [await pool.execute({"eval_id": f"e{n}", "timeout": 5}) for n in range(3)]
        await pool.close()
    assert results == [(url, {"status": "completed", "eval_id": f"e{n}"}) for n in range(3)]


async def test_a_stopping_worker_closes_its_keep_alive_connections_to_executors(
    redis_url: str, namespace: str
) -> None:
    """A worker process that stops (a deploy, a scale-down) leaves no connection open on an
    executor, which would otherwise hold it until its keep-alive timer ends."""
    connections: list[asyncio.BaseTransport] = []

    async def answer(request: web.Request) -> web.Response:
        assert request.transport is not None
        connections.append(request.transport)
        return web.json_response({"status": "completed", "eval_id": (await request.json())["eval_id"]})

    async with fake_executor(answer) as (url, _):
        runtime = WorkerRuntime(
            replace(Settings.from_env(), redis_url=redis_url, namespace=namespace, executor_urls=(url,))
        )
        broker = StubBroker(middleware=[AsyncIO(), CloseRuntime(runtime)])
        results: list[tuple[str, dict[str, Any]]] = []

        @dramatiq.actor(broker=broker)
        async def run_one() -> None:
            results.append(await runtime.resources().executors.execute({"eval_id": "e1", "timeout": 5}))

        worker = Worker(broker, worker_timeout=50)
        worker.start()
        try:
            run_one.send()
            await asyncio.to_thread(broker.join, run_one.queue_name)
            assert results == [(url, {"status": "completed", "eval_id": "e1"})]
            assert not connections[0].is_closing()  # kept alive for the next run
        finally:
            await asyncio.to_thread(worker.stop)
        for _ in range(250):
            if connections[0].is_closing():
                break
            await asyncio.sleep(0.02)
        assert connections[0].is_closing()
