"""Followers of evaluations' status changes, sharing one Redis subscription per process, and
the live output of runs they follow."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import redis.asyncio as aioredis

from actors.executor_client import NDJSON
from app.api.event_streams import EventStreams
from evaluations.store import EvaluationStore, NewEvaluation
from tests.conftest import Stack
from tests.helpers import api_client, execute, make_keys, submit


@asynccontextmanager
async def one_queued(redis_url: str, namespace: str, **options: Any) -> AsyncIterator[tuple[Any, Any, Any]]:
    """A Redis client, a store holding one queued evaluation "e", and an API process's streams."""
    client = aioredis.Redis.from_url(redis_url, decode_responses=True, **options)
    store = EvaluationStore(client, namespace, retention_seconds=3600)
    async with client.pipeline(transaction=True) as pipe:
        store.write_new(pipe, NewEvaluation("e", "print(1)", "python", 5, "default", False, {}))
        await pipe.execute()
    streams = EventStreams(client, store)
    try:
        yield client, store, streams
    finally:
        await streams.close()
        await client.aclose()


async def test_followers_come_and_go_while_the_connection_checks_its_health(
    redis_url: str, namespace: str
) -> None:
    """With no follower left, redis-py checks the idle connection's health before the next
    SUBSCRIBE by reading a PING's answer itself, racing the reader ("read() called while
    another coroutine is already waiting"): the next follower failed."""
    async with one_queued(redis_url, namespace, health_check_interval=0.2) as (_, store, streams):
        for _ in range(8):
            follower = streams.follow("e")
            assert (await anext(follower))["status"] == "queued"
            await follower.aclose()  # the last follower leaves: the channel is unsubscribed
            await asyncio.sleep(0.4)  # a health check falls due
        follower = streams.follow("e")
        assert (await anext(follower))["status"] == "queued"
        await store.transition("e", "running", ("queued",))
        assert (await asyncio.wait_for(anext(follower), 5))["status"] == "running"
        await follower.aclose()


async def test_live_output_goes_only_to_followers_that_asked_and_is_no_status_change(
    redis_url: str, namespace: str
) -> None:
    async with one_queued(redis_url, namespace) as (client, store, streams):
        watching, plain = streams.follow("e", live=True), streams.follow("e")
        assert (await anext(watching))["status"] == (await anext(plain))["status"] == "queued"
        chunk = {"eval_id": "e", "type": "output", "data": "", "seq": 1, "at_ms": 1}  # "" stays ""
        await client.publish(store.keys.events_of("e"), json.dumps(chunk))
        assert await asyncio.wait_for(anext(watching), 5) == chunk
        await store.transition("e", "running", ("queued",))
        assert (await asyncio.wait_for(anext(plain), 5))["status"] == "running"  # the chunk passed it by
        assert (await asyncio.wait_for(anext(watching), 5))["status"] == "running"
        await watching.aclose()
        await plain.aclose()
        assert not streams.live_followers


# -- live output: `output` and `error` events while a run writes ------------------------------


@dataclass
class Sent:
    """One server-sent event, with when it arrived (the event loop's clock)."""

    kind: str
    data: dict[str, Any]
    at: float


async def followed(api: httpx.AsyncClient, eval_id: str) -> list[Sent]:
    """Every event of `eval_id`'s stream, until it closes after the final status."""
    sent, kind = [], None
    loop = asyncio.get_running_loop()
    async with api.stream("GET", f"/api/eval/{eval_id}/events") as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("event: "):
                kind = line[len("event: ") :]
            elif line.startswith("data: "):
                assert kind is not None
                sent.append(Sent(kind, json.loads(line[len("data: ") :]), loop.time()))
    return sent


def joined(sent: list[Sent], kind: str) -> str:
    return "".join(s.data["data"] for s in sent if s.kind == kind)


#: Writes a line every 0.3 s for 1.5 s (and one to stderr), after a moment for its follower to
#: subscribe: live output is sent to whoever follows at the time, never stored.
PROGRESS = """
import sys, time
time.sleep(1)
for n in range(5):
    print(f"step {n}")
    if n == 2:
        print("halfway", file=sys.stderr)
    time.sleep(0.3)
"""


async def test_a_follower_sees_a_programs_output_as_it_writes_it(api: httpx.AsyncClient) -> None:
    eval_id = await submit(api, PROGRESS)
    sent = await followed(api, eval_id)
    final = sent[-1]
    assert final.kind == "status" and final.data["status"] == "completed"
    assert [s.data["status"] for s in sent if s.kind == "status"][-2:] == ["running", "completed"]
    stored = (await api.get(f"/api/eval/{eval_id}")).json()
    assert joined(sent, "output") == stored["output"] == "".join(f"step {n}\n" for n in range(5))
    assert joined(sent, "error") == stored["error"] == "halfway\n"
    outputs = [s for s in sent if s.kind == "output"]
    assert len(outputs) >= 3  # while it ran, not in one piece at its end
    assert outputs[0].data["data"].startswith("step 0\n")
    assert final.at - outputs[0].at > 0.6  # the first line came while the program still ran
    seqs = [s.data["seq"] for s in sent if s.kind in ("output", "error")]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert all(set(s.data) <= {"data", "seq", "at_ms", "truncated"} for s in sent if s.kind != "status")
    assert not any(s.data.get("truncated") for s in sent)
    # live output is not recorded: the timeline and a replay hold status changes alone
    timeline = (await api.get(f"/api/eval/{eval_id}/timeline")).json()["events"]
    assert [e["status"] for e in timeline] == [s.data["status"] for s in sent if s.kind == "status"]
    replay = await followed(api, eval_id)
    assert {s.kind for s in replay} == {"status"}


async def test_output_past_the_cap_streams_the_stored_part_and_says_it_was_cut(
    api: httpx.AsyncClient, executor: httpx.AsyncClient
) -> None:
    flood = "import sys, time\ntime.sleep(1)\nfor n in range(3000):\n    print(f'{n:08d}' * 4)\n"
    eval_id = await submit(api, flood)
    sent = await followed(api, eval_id)
    stored = (await api.get(f"/api/eval/{eval_id}")).json()
    cap = 64 * 1024  # SANDBOX_OUTPUT_LIMIT_BYTES's default: what is stored
    assert stored["status"] == "completed" and stored["output_truncated"] is True
    assert len(stored["output"]) == cap and joined(sent, "output") == stored["output"]
    outputs = [s.data for s in sent if s.kind == "output"]
    assert outputs[-1].get("truncated") is True and [o.get("truncated") for o in outputs].count(True) == 1
    assert all(len(o["data"]) <= cap for o in outputs) and len(outputs) <= cap // 4096 + 20
    # what is stored is what a run nobody streams stores
    alone = await execute(executor, flood)
    same = ("status", "output", "output_truncated", "error_truncated")
    assert {k: alone[k] for k in same} == {k: stored[k] for k in same}
    assert alone["error"] == "" and stored["error"] is None  # the record keeps "" as nothing


async def test_a_streamed_execute_answers_what_the_unstreamed_one_does(executor: httpx.AsyncClient) -> None:
    """The executor's streamed answer (what workers ask for): chunks, then the same result."""
    code = "import sys\nprint('out')\nprint('err', file=sys.stderr)\nsys.exit(3)"
    body = {"eval_id": f"t-{uuid.uuid4().hex[:8]}", "code": code, "language": "python", "timeout": 10}
    async with executor.stream("POST", "/execute", json=body, headers={"accept": NDJSON}) as response:
        assert response.status_code == 200 and response.headers["content-type"] == NDJSON
        lines = [json.loads(line) async for line in response.aiter_lines() if line]
    *chunks, last = lines
    assert sorted((c["type"], c["data"]) for c in chunks) == [("error", "err\n"), ("output", "out\n")]
    assert last["type"] == "result" and last["status"] == 200
    alone = await execute(executor, code)
    same = ("status", "exit_code", "output", "error", "output_truncated", "error_truncated")
    assert {k: last["body"][k] for k in same} == {k: alone[k] for k in same}
    assert last["body"]["status"] == "failed" and set(last["body"]) == set(alone)
    # a run with test cases is not streamed: its answer is the one it always had
    cases = {**body, "eval_id": f"t-{uuid.uuid4().hex[:8]}", "code": "print(input())",
             "tests": [{"stdin": "a", "expected_output": "a"}]}  # fmt: skip
    answer = await executor.post("/execute", json=cases, headers={"accept": NDJSON})
    assert answer.headers["content-type"] == "application/json" and answer.json()["verdict"] == "accepted"


async def test_a_key_that_may_not_see_an_evaluation_gets_none_of_its_output(
    shared_stack: Stack, aredis: aioredis.Redis
) -> None:
    alice, bob = await make_keys(aredis, shared_stack.namespace, "standard", "standard")
    async with (
        api_client(shared_stack.api_url, key=alice) as a,
        api_client(shared_stack.api_url, key=bob) as b,
    ):
        eval_id = await submit(a, "import time\ntime.sleep(1)\nprint('for alice only')\ntime.sleep(0.3)")
        owner = asyncio.create_task(followed(a, eval_id))
        hidden = await b.get(f"/api/eval/{eval_id}/events")
        assert hidden.status_code == 404 and "for alice only" not in hidden.text
        assert hidden.json()["error"] == (await b.get("/api/eval/no-such-id/events")).json()["error"]
        sent = await asyncio.wait_for(owner, 30)
        assert joined(sent, "output") == "for alice only\n"
        assert (await b.get(f"/api/eval/{eval_id}/events")).status_code == 404  # finished: still not
