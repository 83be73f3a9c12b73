"""Who may do what: keys, tiers, ownership, quotas, the executor's secret, secrets kept out of logs."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import sys
from contextlib import ExitStack

import httpx
import redis.asyncio as aioredis

from bench.stack import LOG_DIR, ROOT, free_port, free_uid_base
from evaluations.api_keys import KeyStore
from tests.conftest import Stack, stack_env, start_api
from tests.helpers import EXECUTOR_SECRET, METRICS_TOKEN, TEST_ADMIN_KEY, api_client, make_keys


async def test_keys_tiers_and_ownership(shared_stack: Stack, aredis: aioredis.Redis) -> None:
    alice, bob, premium = await make_keys(aredis, shared_stack.namespace, "standard", "standard", "premium")
    url = shared_stack.api_url
    async with (
        api_client(url, key=None) as anyone,
        api_client(url, key=alice) as a,
        api_client(url, key=bob) as b,
        api_client(url, key=premium) as p,
        api_client(url) as admin,
        api_client(url, key=METRICS_TOKEN) as scraper,
        api_client(url, key="cru_0000_made-up") as stranger,
    ):
        # Nothing but /health without a key (which names no addresses and ignores bad keys).
        health = await anyone.get("/health")
        assert health.status_code == 200 and "executors" not in health.json()
        assert (await stranger.get("/health")).status_code == 200
        for path in ("/api/evaluations", "/api/health", "/metrics", "/openapi.json", "/api/dlq/tasks"):
            refused = await anyone.get(path)
            assert refused.status_code == 401 and "API key is required" in refused.json()["error"], path
        assert (await stranger.get("/api/evaluations")).status_code == 401
        bearer = await anyone.get("/api/evaluations", headers={"authorization": f"Bearer {alice}"})
        assert bearer.status_code == 200

        # A key sees, lists and cancels only its own; someone else's is "not found".
        answer = await a.post("/api/eval", json={"code": "import time; time.sleep(5)"})
        assert answer.status_code == 200 and answer.headers["RateLimit-Limit"] == "20"
        mine = answer.json()["eval_id"]
        missing = (await b.get("/api/eval/no-such-id")).json()
        for path in (f"/api/eval/{mine}", f"/api/eval-status/{mine}", f"/api/eval/{mine}/timeline",
                     f"/api/eval/{mine}/events"):  # fmt: skip
            hidden = await b.get(path)
            assert hidden.status_code == 404 and hidden.json()["error"] == missing["error"], path
        assert (await b.post(f"/api/eval/{mine}/cancel", params={"terminate": "true"})).status_code == 404
        assert mine not in [e["eval_id"] for e in (await b.get("/api/evaluations")).json()["evaluations"]]
        assert [e["eval_id"] for e in (await a.get("/api/evaluations")).json()["evaluations"]] == [mine]
        own_view = (await a.get(f"/api/eval/{mine}")).json()
        assert "executor" not in own_view and "worker" not in own_view  # addresses are for operators
        assert (await admin.get(f"/api/eval/{mine}")).status_code == 200
        # Ids are global, so only admin keys may choose one (a "taken" answer would leak it).
        chosen = await b.post("/api/eval", json={"code": "print(1)", "eval_id": mine})
        assert chosen.status_code == 403 and "admin" in chosen.json()["error"]
        # ':' separates parts of Redis keys: never part of an id, and such paths are just unknown.
        assert (await b.get(f"/api/eval/{mine}:events")).status_code == 404
        assert (await b.post(f"/api/eval/{mine}:events/cancel")).status_code == 404
        squat = await admin.post("/api/eval", json={"code": "print(1)", "eval_id": "squat:events"})
        assert squat.status_code == 422
        cancelled = await a.post(f"/api/eval/{mine}/cancel", params={"terminate": "true"})
        assert cancelled.status_code == 200

        # Priority is for premium and admin keys; a standard key is told so.
        refused = await a.post("/api/eval", json={"code": "print(1)", "priority": True})
        assert refused.status_code == 403 and "premium" in refused.json()["error"]
        high = await p.post("/api/eval", json={"code": "print(1)", "priority": True})
        assert high.status_code == 200
        assert (await p.get(f"/api/eval/{high.json()['eval_id']}")).json()["queue"] == "high"

        # Operators' endpoints are admin only; /metrics also takes the scrape token (and only it).
        for path in ("/api/dlq/tasks", "/api/dlq/statistics", "/api/celery-status", "/api/queue-status",
                     "/api/migration-status", "/api/rates", "/metrics"):  # fmt: skip
            assert (await a.get(path)).status_code == 403, path
            assert (await admin.get(path)).status_code == 200, path
        assert (await a.put("/api/migration", json={"force_legacy": True})).status_code == 403
        assert (await scraper.get("/metrics")).status_code == 200
        assert (await scraper.get("/api/evaluations")).status_code == 403

        # Revoking works at once.
        key_id = alice.split("_")[1]
        await KeyStore(aredis, shared_stack.namespace).revoke(key_id)
        assert (await a.get("/api/evaluations")).status_code == 401


async def test_rate_limit_and_the_in_progress_cap(
    redis_url: str, executor_url: str, namespace: str, aredis: aioredis.Redis
) -> None:
    limits = {
        "standard": {"per_second": 1, "burst": 3, "max_active": 100, "max_streams": 2},
        "premium": {"max_active": 4},
    }
    env = stack_env(redis_url, namespace, executor_url, CRUCIBLE_RATE_LIMITS=json.dumps(limits))
    standard, premium = await make_keys(aredis, namespace, "standard", "premium")
    with ExitStack() as stack:  # an API alone: submissions stay queued
        s = start_api(stack, "quota", env)
        async with api_client(s.api_url, key=standard) as api, api_client(s.api_url, key=premium) as prem:
            remaining, own = [], []
            for _ in range(3):
                answer = await api.post("/api/eval", json={"code": "print(1)"})
                assert answer.status_code == 200
                remaining.append(answer.headers["RateLimit-Remaining"])
                own.append(answer.json()["eval_id"])
            assert remaining == ["2", "1", "0"]
            limited = await api.post("/api/eval", json={"code": "print(1)"})
            assert limited.status_code == 429 and int(limited.headers["Retry-After"]) >= 1
            assert limited.headers["RateLimit-Remaining"] == "0" and "rate limit" in limited.json()["error"]
            # a refused submission leaves nothing behind: the quota, record and message are one call
            assert (await api.get("/api/evaluations")).json()["total"] == 3
            assert await aredis.llen(f"{namespace}:queue:default") == 3
            batch = await api.post("/api/eval-batch", json={"evaluations": [{"code": "print(1)"}] * 5})
            assert batch.status_code == 413  # more than the bucket ever holds
            await asyncio.sleep(1.1)
            assert (await api.post("/api/eval", json={"code": "print(1)"})).status_code == 200

            # Premium: at most 4 queued or running at once, even when 8 arrive together; finishing
            # one frees a place.
            answers = await asyncio.gather(
                *(prem.post("/api/eval", json={"code": "print(2)"}) for _ in range(8))
            )
            assert sorted(a.status_code for a in answers) == [200] * 4 + [429] * 4
            full = next(a for a in answers if a.status_code == 429)
            assert "in progress" in full.json()["error"]
            first = next(a for a in answers if a.status_code == 200).json()["eval_id"]
            assert (await prem.post(f"/api/eval/{first}/cancel")).status_code == 200
            assert (await prem.post("/api/eval", json={"code": "print(2)"})).status_code == 200

            # Event streams: two at once for this key; a third is refused until one closes.
            events = f"/api/eval/{own[0]}/events"
            async with api.stream("GET", events) as one, api.stream("GET", events) as two:
                assert one.status_code == two.status_code == 200
                third = await api.get(events)
                assert third.status_code == 429 and "streams" in third.json()["error"]
            await asyncio.sleep(0.3)  # the server notices the closed streams
            async with api.stream("GET", events) as again:
                assert again.status_code == 200


async def test_malformed_requests_get_a_4xx_json_error(api: httpx.AsyncClient) -> None:
    cases = [
        # not JSON we can read: 422, as the original (FastAPI) service answered
        ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 422),
        (
            {
                "content": b'{"code": "x", "timeout": 1' + b"0" * 5000 + b"}",
                "headers": {"content-type": "application/json"},
            },
            422,
        ),
        ({"content": b"[" * 200_000, "headers": {"content-type": "application/json"}}, 422),
        (
            {"content": b"code=print(1)", "headers": {"content-type": "application/x-www-form-urlencoded"}},
            415,
        ),
        # beyond a double, and a lone surrogate (not Unicode): valid JSON grammar we cannot read
        ({"json": {"code": "print(1)", "timeout": 10**400}}, 422),
        ({"content": b'{"code": "\\ud800"}', "headers": {"content-type": "application/json"}}, 422),
        ({"json": {"code": "print(1)", "timeout": 10**300}}, 422),
        ({"json": {"code": 5}}, 422),
        ({"json": {"code": "print(1)", "args": [1]}}, 422),
        ({"json": ["code"]}, 422),
        ({"json": {"code": "x" * (64 * 1024 + 1)}}, 413),
        ({"content": b"0" * (3 * 1024 * 1024), "headers": {"content-type": "application/json"}}, 413),
    ]
    for request, status in cases:
        answer = await api.post("/api/eval", **request)
        assert answer.status_code == status, (request, answer.text)
        assert set(answer.json()) == {"error", "details"}


async def test_the_executor_takes_work_only_with_its_secret(executor_url: str) -> None:
    body = {"eval_id": "secret-check", "code": "print(1)"}
    async with httpx.AsyncClient(base_url=executor_url, timeout=30) as anyone:
        assert (await anyone.get("/health")).status_code == 200
        refused = await anyone.post("/execute", json=body)
        assert refused.status_code == 401 and "EXECUTOR_SECRET" in refused.json()["error"]  # not an API key
        wrong = await anyone.post("/execute", json=body, headers={"authorization": "Bearer guess"})
        assert wrong.status_code == 401 and EXECUTOR_SECRET not in wrong.text
        assert (await anyone.get("/running")).status_code == 401
        assert (await anyone.post("/kill/secret-check")).status_code == 401

    # It listens on loopback only (by default): another address of this host is refused.
    port = int(executor_url.rsplit(":", 1)[1])
    outside = next(
        (a for a in {i[4][0] for i in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)}
         if not a.startswith("127.")), None,
    )  # fmt: skip
    if outside is not None:
        with socket.socket() as probe:
            assert probe.connect_ex((outside, port)) != 0

    # Without a secret it does not start at all (on a uid range of its own: the default one may
    # be held by another executor on this host, which it would refuse first).
    env = {"EXECUTOR_SECRET": "", "EXECUTOR_PORT": str(free_port()), "PATH": "/usr/bin:/bin",
           "SANDBOX_UID_BASE": str(free_uid_base())}  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "app.cli", "executor"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0 and "EXECUTOR_SECRET is not set" in done.stderr


def test_no_secret_is_ever_logged() -> None:
    """Every log the suite's processes wrote so far: no API key, token or executor secret
    (but for the one line where `crucible up` prints the admin key it made, on purpose)."""
    logs = list(LOG_DIR.glob("*.log"))
    assert logs
    for path in logs:
        lines = [
            line for line in path.read_text(errors="replace").splitlines() if "  admin key  cru_" not in line
        ]
        text = "\n".join(lines)
        for secret in (TEST_ADMIN_KEY, EXECUTOR_SECRET, METRICS_TOKEN):
            assert secret not in text, f"{secret[:12]}... in {path.name}"
        assert not re.search(r"cru_[0-9a-f]{8}_", text), path.name
