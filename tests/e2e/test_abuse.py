"""What one tenant can take from the others: each attack comes from a standard key, and the
test checks what another key experiences."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from evaluations.redis_keys import RedisKeys
from tests.conftest import Stack
from tests.e2e.test_security import make_keys
from tests.helpers import api_client, submit


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
