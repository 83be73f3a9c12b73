"""Webhooks end to end: a stack whose operator allows 127.0.0.1 (spelt so) as a webhook host, and
real HTTP receivers on loopback: one that takes them, one that fails, one that is slow, one that
redirects to another. Every other spelling of a non-global address is refused at submission.
Deliveries are retried fast here: `network_error` is overridden to 2 retries 0.2 s apart."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from bench.stack import delete_namespace
from evaluations.webhooks import DELIVERY_HEADER, SIGNATURE_HEADER, verify
from tests.conftest import Stack, stack_env, start_stack
from tests.helpers import METRICS_TOKEN, api_client, make_keys, wait_final

POLICY = {"network_error": {"base_delay": 0.2, "max_delay": 0.3, "max_retries": 2}}
TIMEOUT_S = 1
MAX_IN_FLIGHT = 2


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receivers:
    """A loopback HTTP server: `/ok` takes a webhook, `/fail` answers 500 until told to take
    them, `/slow` answers after the webhook timeout, `/redirect` sends to `/ok`."""

    port: int = 0
    got: list[Received] = field(default_factory=list)
    failing: bool = True
    #: `/hold` answers after half a second: how many it held at once, at most
    holding: int = 0
    most_held: int = 0

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def to(self, path: str) -> list[Received]:
        return [r for r in self.got if r.path == path]


@pytest.fixture(scope="module")
def receivers() -> Iterator[Receivers]:
    state = Receivers()
    counting = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
            path = self.path.split("?", 1)[0]
            state.got.append(Received(path, {k.lower(): v for k, v in self.headers.items()}, body))
            if path == "/slow":
                time.sleep(TIMEOUT_S + 1)
            if path == "/hold":
                with counting:
                    state.holding += 1
                    state.most_held = max(state.most_held, state.holding)
                time.sleep(0.5)
                with counting:
                    state.holding -= 1
            code = {"/fail": 500 if state.failing else 204, "/redirect": 302}.get(path, 200)
            self.send_response(code)
            if code == 302:
                self.send_header("location", f"{state.base}/ok")
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield state
    server.shutdown()


@pytest.fixture(scope="module")
def hooks_stack(redis_url: str, executor_url: str) -> Iterator[Stack]:
    ns = f"crucible-test-{uuid.uuid4().hex[:8]}"
    env = stack_env(
        redis_url, ns, executor_url, CRUCIBLE_WEBHOOK_ALLOW_HOSTS="127.0.0.1",
        CRUCIBLE_WEBHOOK_TIMEOUT_S=str(TIMEOUT_S), CRUCIBLE_RETRY_POLICIES=json.dumps(POLICY),
        CRUCIBLE_WEBHOOK_MAX_IN_FLIGHT=str(MAX_IN_FLIGHT),
    )  # fmt: skip
    with ExitStack() as stack:
        yield start_stack(stack, "webhooks", env)
    delete_namespace(redis_url, ns)


@pytest.fixture
async def owner(hooks_stack: Stack, aredis: aioredis.Redis) -> AsyncIterator[httpx.AsyncClient]:
    """A standard key's client: webhooks go to the key that submitted."""
    (secret,) = await make_keys(aredis, hooks_stack.namespace, "standard")
    async with api_client(hooks_stack.api_url, secret) as client:
        yield client


async def until(check: Any, seconds: float = 30) -> Any:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if value := await check():
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"not within {seconds}s")


async def callback_of(api: httpx.AsyncClient, eval_id: str, status: str) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        callback = (await api.get(f"/api/eval/{eval_id}")).json()["callback"]
        return callback if callback["status"] == status else None

    return dict(await until(check))


async def test_a_finished_evaluation_is_posted_signed_to_its_callback(
    owner: httpx.AsyncClient, receivers: Receivers, hooks_stack: Stack
) -> None:
    secret = (await owner.get("/api/webhook-secret")).json()["secret"]
    answer = await owner.post("/api/eval", json={
        "code": "print('hooked')", "callback_url": f"{receivers.base}/ok?from=test",
        "callback_headers": {"Authorization": "Bearer receiver-token"},
    })  # fmt: skip
    assert answer.status_code == 200, answer.text
    eval_id = answer.json()["eval_id"]
    callback = await callback_of(owner, eval_id, "delivered")
    assert callback["attempts"] == 1 and callback["url"] == f"{receivers.base}/ok?from=test"
    (got,) = [r for r in receivers.to("/ok") if json.loads(r.body)["eval_id"] == eval_id]
    assert verify(secret, got.body, got.headers[SIGNATURE_HEADER.lower()])
    assert not verify(secret, got.body + b" ", got.headers[SIGNATURE_HEADER.lower()])
    assert got.headers["authorization"] == "Bearer receiver-token"
    assert got.headers[DELIVERY_HEADER.lower()].startswith(f"{eval_id}.")
    shown = (await owner.get(f"/api/eval/{eval_id}")).json()
    shown.pop("callback")
    assert json.loads(got.body) == shown  # the same JSON as GET shows its owner
    assert shown["output"] == "hooked\n"

    # a rotated secret signs what comes after it, and the old one no longer verifies
    rotated = (await owner.post("/api/webhook-secret/rotate")).json()["secret"]
    assert rotated != secret
    second = (
        await owner.post("/api/eval", json={"code": "print(2)", "callback_url": f"{receivers.base}/ok"})
    ).json()
    await callback_of(owner, second["eval_id"], "delivered")
    (got,) = [r for r in receivers.to("/ok") if json.loads(r.body)["eval_id"] == second["eval_id"]]
    signed = got.headers[SIGNATURE_HEADER.lower()]
    assert verify(rotated, got.body, signed) and not verify(secret, got.body, signed)

    async with api_client(hooks_stack.api_url, key=METRICS_TOKEN) as m:
        metrics = (await m.get("/metrics")).text
    delivered = [
        line
        for line in metrics.splitlines()
        if line.startswith('crucible_callbacks_total{outcome="delivered"}')
    ]
    assert delivered and float(delivered[0].split()[-1]) >= 2


async def test_a_failing_receiver_is_retried_dead_lettered_and_retried_from_the_dlq(
    owner: httpx.AsyncClient, receivers: Receivers, hooks_stack: Stack
) -> None:
    receivers.failing = True
    eval_id = (
        await owner.post("/api/eval", json={"code": "print(1)", "callback_url": f"{receivers.base}/fail"})
    ).json()["eval_id"]
    callback = await callback_of(owner, eval_id, "failed")
    assert callback["attempts"] == 3 and callback["last_error"] == "HTTP 500"  # 1 + 2 retries
    assert (await owner.get(f"/api/eval/{eval_id}")).json()["status"] == "completed"  # the run is unharmed
    async with api_client(hooks_stack.api_url) as admin:
        entries = (await admin.get("/api/dlq/tasks")).json()["tasks"]
        (entry,) = [e for e in entries if e["task_name"] == "deliver_callback" and e["args"][0] == eval_id]
        receivers.failing = False
        assert (await admin.post(f"/api/dlq/tasks/{entry['task_id']}/retry")).status_code == 200
    callback = await callback_of(owner, eval_id, "delivered")
    tries = [r for r in receivers.to("/fail") if json.loads(r.body)["eval_id"] == eval_id]
    assert len(tries) == 4 and len({r.headers[DELIVERY_HEADER.lower()] for r in tries}) == 1  # one id


async def test_a_slow_receiver_times_out_and_a_redirect_is_not_followed(
    owner: httpx.AsyncClient, receivers: Receivers
) -> None:
    slow, moved = [
        (
            await owner.post(
                "/api/eval", json={"code": "print(1)", "callback_url": f"{receivers.base}{path}"}
            )
        ).json()["eval_id"]
        for path in ("/slow", "/redirect")
    ]
    slow_callback = await callback_of(owner, slow, "failed")
    moved_callback = await callback_of(owner, moved, "failed")
    assert slow_callback["last_error"] == f"no answer within {TIMEOUT_S} s"
    assert moved_callback["last_error"] == "HTTP 302 (redirects are not followed)"
    assert not [r for r in receivers.to("/ok") if json.loads(r.body)["eval_id"] == moved]


@pytest.mark.parametrize(
    "url",
    [
        "http://localhost:{port}/ok", "http://127.1:{port}/ok", "http://2130706433:{port}/ok",
        "http://0x7f.1:{port}/ok", "http://[::1]:{port}/ok", "http://169.254.169.254/latest/meta-data",
        "http://10.0.0.1/hook", "ftp://127.0.0.1/hook", "http://user:pass@127.0.0.1:{port}/ok", "not a url",
    ],
)  # fmt: skip
async def test_a_callback_url_crucible_may_not_reach_is_refused_at_submission(
    owner: httpx.AsyncClient, receivers: Receivers, url: str
) -> None:
    answer = await owner.post(
        "/api/eval", json={"code": "print(1)", "callback_url": url.format(port=receivers.port)}
    )
    assert answer.status_code == 422, answer.text
    assert answer.json()["details"]["field"] == "callback_url"


async def test_callback_headers_are_limited_to_the_allowed_names(
    owner: httpx.AsyncClient, receivers: Receivers
) -> None:
    answer = await owner.post("/api/eval", json={
        "code": "print(1)", "callback_url": f"{receivers.base}/ok", "callback_headers": {"Host": "evil"},
    })  # fmt: skip
    assert answer.status_code == 422 and answer.json()["details"]["field"] == "callback_headers"
    batch = await owner.post("/api/eval-batch", json={"evaluations": [
        {"code": "print(1)", "callback_url": "http://127.1/x"},
        {"code": "print(2)", "callback_url": f"{receivers.base}/ok"},
    ]})  # fmt: skip
    items = batch.json()["evaluations"]
    assert items[0]["status"] == "failed" and items[0]["field"] == "callback_url"
    assert items[1]["status"] == "queued"
    await wait_final(owner, items[1]["eval_id"])
    await callback_of(owner, items[1]["eval_id"], "delivered")


async def test_one_keys_deliveries_hold_at_most_their_share_of_worker_slots(
    owner: httpx.AsyncClient, receivers: Receivers
) -> None:
    """Receivers that take their time cannot tie up every worker slot (8 here) with one key's
    deliveries: the key's others wait, then are delivered, each with one attempt."""
    ids = [
        (
            await owner.post(
                "/api/eval", json={"code": f"print({n})", "callback_url": f"{receivers.base}/hold"}
            )
        ).json()["eval_id"]
        for n in range(6)
    ]
    callbacks = [await callback_of(owner, eval_id, "delivered") for eval_id in ids]
    assert [c["attempts"] for c in callbacks] == [1] * 6
    assert receivers.most_held == MAX_IN_FLIGHT
