"""`POST /api/eval?wait=true`: the result in one request when it comes in time, else 202; each
wait holds one of the key's stream places and no Redis connection of its own."""

from __future__ import annotations

import asyncio
import time
import uuid
from contextlib import AsyncExitStack
from typing import Any
from urllib.parse import urlsplit

import httpx
import psutil
import redis.asyncio as aioredis

from evaluations.redis_keys import RedisKeys
from tests.conftest import Stack
from tests.helpers import api_client, make_keys, submit, wait_final

WAIT = {"wait": "true"}


async def test_a_quick_program_answers_with_its_result(api: httpx.AsyncClient) -> None:
    answer = await api.post("/api/eval", params=WAIT, json={"code": "print('waited for')", "tiemout": 5})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["status"] == "completed" and body["success"] is True
    assert body["output"] == "waited for\n" and body["exit_code"] == 0
    assert body["task_id"] == f"celery-{body['eval_id']}" and body["warnings"]  # the submit answer's too
    assert int(answer.headers["RateLimit-Remaining"]) >= 0
    # the same as reading it afterwards shows
    shown = (await api.get(f"/api/eval/{body['eval_id']}")).json()
    assert {name: body[name] for name in shown} == shown


async def test_a_slow_program_answers_202_then_finishes(api: httpx.AsyncClient) -> None:
    started = time.monotonic()
    code = "import time; time.sleep(2.5); print('late')"
    answer = await api.post("/api/eval", params={**WAIT, "wait_timeout": "0.5"}, json={"code": code})
    assert answer.status_code == 202, answer.text
    assert time.monotonic() - started < 2.5  # answered at its wait_timeout, not at the end
    body = answer.json()
    assert body["status"] in ("queued", "running") and body["message"] and "RateLimit-Limit" in answer.headers
    final = await wait_final(api, body["eval_id"])
    assert final["status"] == "completed" and final["output"] == "late\n"


async def test_wait_parameters_are_checked_before_anything_is_submitted(api: httpx.AsyncClient) -> None:
    eval_id = f"wait-refused-{uuid.uuid4().hex[:8]}"
    for params, field in [
        ({**WAIT, "wait_timeout": "31"}, "wait_timeout"),  # above CRUCIBLE_MAX_WAIT_S (30)
        ({**WAIT, "wait_timeout": "0"}, "wait_timeout"),
        ({**WAIT, "wait_timeout": "nan"}, "wait_timeout"),
        ({"wait_timeout": "-1"}, "wait_timeout"),  # checked even without wait
        ({"wait": "maybe"}, "wait"),
    ]:
        answer = await api.post("/api/eval", params=params, json={"code": "print(1)", "eval_id": eval_id})
        assert answer.status_code == 422, (params, answer.text)
        assert answer.json()["details"]["field"] == field and field in answer.json()["error"]
    assert (await api.get(f"/api/eval/{eval_id}")).status_code == 404
    # false: answered at once, as without it
    answer = await api.post("/api/eval", params={"wait": "false"}, json={"code": "print(1)"})
    assert answer.status_code == 200 and answer.json()["status"] == "queued"


async def test_a_wait_takes_a_stream_place_before_submitting(
    shared_stack: Stack, aredis: aioredis.Redis
) -> None:
    """A standard key may hold 10 streams: with all 10 open, a wait is refused (429) and
    submits nothing; once they close, waits are answered again and give their place back."""
    (secret,) = await make_keys(aredis, shared_stack.namespace, "standard")
    counter = RedisKeys(shared_stack.namespace).streams(secret.split("_")[1])
    async with api_client(shared_stack.api_url, key=secret) as client:
        sleeper = await submit(client, "import time; time.sleep(30)")
        events = f"/api/eval/{sleeper}/events"
        async with AsyncExitStack() as streams:
            for _ in range(10):
                stream = await streams.enter_async_context(client.stream("GET", events))
                assert stream.status_code == 200
            refused = await client.post("/api/eval", params=WAIT, json={"code": "print('not run')"})
            assert refused.status_code == 429 and "streams" in refused.json()["error"], refused.text
            assert (await client.get("/api/evaluations")).json()["total"] == 1  # nothing submitted
        cancel = await client.post(f"/api/eval/{sleeper}/cancel", params={"terminate": "true"})
        assert cancel.status_code == 200, cancel.text
        await _until(lambda: _count(aredis, counter), 0)  # the streams' places are back
        answer = await client.post("/api/eval", params=WAIT, json={"code": "print('now')"})
        assert answer.status_code == 200 and answer.json()["output"] == "now\n"
        assert await _count(aredis, counter) == 0


async def test_a_client_leaving_gives_back_its_place_and_its_follower(
    shared_stack: Stack, aredis: aioredis.Redis
) -> None:
    (secret,) = await make_keys(aredis, shared_stack.namespace, "standard")
    keys = RedisKeys(shared_stack.namespace)
    counter = keys.streams(secret.split("_")[1])
    async with api_client(shared_stack.api_url, key=secret) as client:
        code = "import time; time.sleep(20)"
        waiting = asyncio.create_task(
            client.post("/api/eval", params={**WAIT, "wait_timeout": "25"}, json={"code": code})
        )

        async def submitted() -> int:
            return (await client.get("/api/evaluations")).json()["total"]

        await _until(submitted, 1)
        eval_id = (await client.get("/api/evaluations")).json()["evaluations"][0]["eval_id"]
        channel = keys.events_of(eval_id)
        await _until(lambda: _subscribers(aredis, channel), 1)  # it waits, on the shared subscription
        assert await _count(aredis, counter) == 1  # holding a stream place
        waiting.cancel()  # the client goes away
        started = time.monotonic()
        await _until(lambda: _count(aredis, counter), 0)
        await _until(lambda: _subscribers(aredis, channel), 0)
        assert time.monotonic() - started < 5  # not at wait_timeout, nor when the program ends
        cancel = await client.post(f"/api/eval/{eval_id}/cancel", params={"terminate": "true"})
        assert cancel.status_code == 200, cancel.text


async def test_concurrent_waits_share_the_api_processs_one_subscription(
    api: httpx.AsyncClient, shared_stack: Stack, redis_url: str, aredis: aioredis.Redis
) -> None:
    """Each wait follows on the API process's one subscription: 20 at once neither subscribe
    nor block a Redis connection each, nor grow the process's connections by one each."""
    api_pid = _listening_pid(int(urlsplit(shared_stack.api_url).port or 0))
    redis_port = urlsplit(redis_url).port or 6379
    before = len(_connections_to(api_pid, redis_port))
    code = "import time; time.sleep(1.5); print('done')"

    async def wait_one(n: int) -> httpx.Response:
        await asyncio.sleep(n * 0.02)  # the submissions themselves one at a time, nearly
        return await api.post("/api/eval", params={**WAIT, "wait_timeout": "25"}, json={"code": code})

    waits = asyncio.gather(*(wait_one(n) for n in range(20)))
    most_connections, most_held, most_channels = before, 0, 0
    while not waits.done():
        clients = await _clients_of(aredis, _connections_to(api_pid, redis_port))
        most_connections = max(most_connections, len(clients))
        held = [c for c in clients if _subscribed(c) or "b" in c["flags"]]  # subscribed or blocked
        most_held = max(most_held, len(held))
        most_channels = max([most_channels, *(int(c.get("sub", 0)) for c in clients)])
        await asyncio.sleep(0.05)
    answers = await waits
    assert [a.status_code for a in answers] == [200] * 20, [a.text for a in answers if a.status_code != 200]
    assert all(a.json()["output"] == "done\n" for a in answers)
    assert most_held <= 1, most_held  # the shared subscription, nothing else
    assert most_channels >= 10, most_channels  # one connection carried many waits at once
    assert most_connections - before < 10, (before, most_connections)


def _listening_pid(port: int) -> int:
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
            return conn.pid
    raise AssertionError(f"no process of ours listens on {port}")


def _connections_to(pid: int, port: int) -> set[int]:
    """The local ports of `pid`'s connections to `port` (Redis)."""
    return {
        c.laddr.port
        for c in psutil.Process(pid).net_connections(kind="tcp")
        if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED
    }


async def _clients_of(aredis: aioredis.Redis, ports: set[int]) -> list[dict[str, Any]]:
    """CLIENT LIST's entries for the connections from these local ports."""
    return [c for c in await aredis.client_list() if int(c["addr"].rsplit(":", 1)[1]) in ports]


def _subscribed(client: dict[str, Any]) -> bool:
    return "P" in client["flags"] or any(int(client.get(k, 0)) for k in ("sub", "psub", "ssub"))


async def _count(aredis: aioredis.Redis, key: str) -> int:
    return int(await aredis.get(key) or 0)


async def _subscribers(aredis: aioredis.Redis, channel: str) -> int:
    return int((await aredis.pubsub_numsub(channel))[0][1])


async def _until(read: Any, expected: int, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while (value := await read()) != expected:
        assert time.monotonic() < deadline, f"still {value}, not {expected}"
        await asyncio.sleep(0.05)
