"""What one tenant can take from the others: each attack comes from a standard key, and the
test checks what another key experiences."""

from __future__ import annotations

import asyncio
from contextlib import ExitStack

import redis.asyncio as aioredis

from bench.stack import redis_server
from evaluations.api_keys import KeyStore
from evaluations.redis_keys import RedisKeys
from tests.conftest import Stack, stack_env, start_api
from tests.helpers import TEST_ADMIN_KEY, api_client, make_keys, submit, wait_final


async def test_listing_is_rate_limited_per_key_and_never_reads_whole_programs(
    shared_stack: Stack, aredis: aioredis.Redis
) -> None:
    """A review's 32 concurrent listing clients of one key took another key's listing from
    4.8 ms to 250 ms: every row read its whole code (up to 64 KiB) to show 100 characters."""
    attacker, bystander = await make_keys(aredis, shared_stack.namespace, "standard", "standard")
    url, keys = shared_stack.api_url, RedisKeys(shared_stack.namespace)
    async with api_client(url, key=attacker) as a, api_client(url, key=bystander) as b:
        big = "# " + "x" * 60_000 + "\nprint('big')"
        eval_id = await submit(a, big)
        listing = await a.get("/api/evaluations", params={"limit": 10})
        assert listing.status_code == 200
        assert listing.json()["evaluations"][0]["code_preview"] == big[:100]
        # the row comes from the stored preview: without the code it still shows
        await aredis.hdel(keys.record(eval_id), "code")
        again = (await a.get("/api/evaluations", params={"limit": 10})).json()["evaluations"]
        assert again[0]["code_preview"] == big[:100]

        pages = await asyncio.gather(*(a.get("/api/evaluations", params={"limit": 1000}) for _ in range(40)))
        refused = [p for p in pages if p.status_code == 429]
        assert refused, [p.status_code for p in pages]  # 40 pages of 1000 rows: 800 reads, burst 100
        assert int(refused[0].headers["Retry-After"]) >= 1
        assert "read rate limit" in refused[0].json()["error"]
        assert (await b.get("/api/evaluations")).status_code == 200  # another key's reads are its own


async def test_a_record_written_before_previews_still_lists_its_preview(
    shared_stack: Stack, aredis: aioredis.Redis
) -> None:
    (owner,) = await make_keys(aredis, shared_stack.namespace, "standard")
    keys = RedisKeys(shared_stack.namespace)
    async with api_client(shared_stack.api_url, key=owner) as client:
        eval_id = await submit(client, "print('written by an earlier release')")
        await aredis.hdel(keys.record(eval_id), "code_preview")
        rows = (await client.get("/api/evaluations")).json()["evaluations"]
        assert rows[0]["code_preview"] == "print('written by an earlier release')"


async def test_slow_clients_cannot_hold_connections(
    redis_url: str, namespace: str, executor_url: str
) -> None:
    """A review held 350 connections open past 30 s with requests never finished."""
    env = stack_env(
        redis_url, namespace, executor_url, CRUCIBLE_HEADER_TIMEOUT_S="2", CRUCIBLE_BODY_TIMEOUT_S="2"
    )
    with ExitStack() as stack:
        api = start_api(stack, "slow-clients-api", env)
        host, port = api.api_url.removeprefix("http://").split(":")
        slow_headers = []
        for _ in range(50):
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(b"POST /api/eval HTTP/1.1\r\nHost: x\r\nX-Api-Key: ")  # and never more
            slow_headers.append((reader, writer))
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            f"POST /api/eval HTTP/1.1\r\nHost: x\r\nX-API-Key: {TEST_ADMIN_KEY}\r\n"
            'Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"code":'.encode()
        )  # a tenth of the body it announced
        async with api_client(api.api_url) as client:
            assert (await client.get("/api/health")).status_code == 200  # others are served meanwhile
        answer = await asyncio.wait_for(reader.read(), 10)
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b"request body not received within 2 s" in answer
        closed = await asyncio.wait_for(asyncio.gather(*(r.read() for r, _ in slow_headers)), 10)
        assert closed == [b""] * 50  # each closed by the server, without an answer
        for _, w in [*slow_headers, (reader, writer)]:
            w.close()


async def test_new_submissions_are_refused_before_redis_is_full(executor_url: str) -> None:
    """At the standard tier's 2/s of maximum programs Redis grew ~1.6 GiB an hour, with no
    maxmemory: it would refuse writes mid-way through whatever was writing (a result, a retry)."""
    with redis_server() as url, ExitStack() as stack:
        client = aioredis.Redis.from_url(url)
        api = start_api(stack, "full-redis-api", stack_env(url, "full", executor_url))
        async with api_client(api.api_url) as admin:
            used = (await client.info("memory"))["used_memory"]
            await client.config_set("maxmemory", int(used / 0.95))  # 95 % full
            await asyncio.sleep(1.1)  # each API process reads INFO at most once a second
            refused = await admin.post("/api/eval", json={"code": "print(1)"})
            assert refused.status_code == 503 and refused.headers["Retry-After"] == "60"
            assert "storage nearly full" in refused.json()["error"]
            health = (await admin.get("/health")).json()
            assert health["storage"] == "nearly_full"
            assert health["redis_memory"]["used_share"] >= 0.9
            await client.config_set("maxmemory", used * 20)  # room again
            await asyncio.sleep(1.1)
            assert (await admin.post("/api/eval", json={"code": "print(1)"})).status_code == 200
            assert (await admin.get("/health")).json()["storage"] == "ok"
        await client.aclose()


async def test_a_key_storing_too_much_in_an_hour_is_refused_until_the_next(
    shared_stack: Stack, aredis: aioredis.Redis
) -> None:
    """Twenty evaluations with maximum code, stdout and stderr added 231 KiB each: at the
    standard tier's 2/s that was ~1.6 GiB an hour. Each key's finished evaluations may store
    `stored_mb_per_hour` (standard 200 MB)."""
    heavy, other = await make_keys(aredis, shared_stack.namespace, "standard", "standard")
    keys = RedisKeys(shared_stack.namespace)
    async with (
        api_client(shared_stack.api_url, key=heavy) as h,
        api_client(shared_stack.api_url, key=other) as o,
    ):
        code = "import sys\nprint('o' * 5000)\nprint('e' * 3000, file=sys.stderr)"
        final = await wait_final(h, await submit(h, code))
        heavy_id = (await KeyStore(aredis, shared_stack.namespace).lookup(heavy)).id
        counters = [k async for k in aredis.scan_iter(match=f"{keys.stored_bytes(heavy_id)}:*")]
        assert len(counters) == 1
        assert int(await aredis.get(counters[0])) >= len(code) + 5001 + 3001
        assert final["status"] == "completed"
        await aredis.set(counters[0], 200 * 2**20)  # the hour's 200 MB used
        refused = await h.post("/api/eval", json={"code": "print(1)"})
        assert refused.status_code == 429 and "stored-bytes quota" in refused.json()["error"]
        assert 0 < int(refused.headers["Retry-After"]) <= 3600
        assert (await o.post("/api/eval", json={"code": "print(1)"})).status_code == 200


async def test_one_key_runs_at_most_its_max_running_at_once_and_others_get_slots(
    shared_stack: Stack, aredis: aioredis.Redis
) -> None:
    """Eight submissions of one standard key took every slot (8 per executor) and another
    key's hello world waited behind them. A standard key runs at most `max_running` (2) at
    once; its other evaluations wait, behind other keys' work."""
    hog, other = await make_keys(aredis, shared_stack.namespace, "standard", "standard")
    keys = RedisKeys(shared_stack.namespace)
    async with (
        api_client(shared_stack.api_url, key=hog) as h,
        api_client(shared_stack.api_url, key=other) as o,
    ):
        hog_ids = [await submit(h, "import time\ntime.sleep(4)", timeout=4) for _ in range(6)]
        hog_key = (await KeyStore(aredis, shared_stack.namespace).lookup(hog)).id
        most = 0
        for _ in range(20):  # 2 s: each hog run takes 4
            statuses = [(await h.get(f"/api/eval/{i}")).json()["status"] for i in hog_ids]
            most = max(most, statuses.count("running"), await aredis.scard(keys.running(hog_key)))
            await asyncio.sleep(0.1)
        assert 1 <= most <= 2, most
        started = asyncio.get_running_loop().time()
        mine = await wait_final(o, await submit(o, "print('not behind them')"), seconds=30)
        assert mine["status"] == "completed" and asyncio.get_running_loop().time() - started < 3.5
        for eval_id in hog_ids:
            await h.post(f"/api/eval/{eval_id}/cancel", params={"terminate": "true"})
