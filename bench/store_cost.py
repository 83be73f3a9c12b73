"""Store cost: the Redis memory one finished evaluation takes (its record, timeline and index
entries), measured through the whole stack, and what that means for a retention.

    .venv/bin/python -m bench store [--evaluations 2000] [--json out.json]

A fresh embedded Valkey, an executor, a worker and the API; a warm-up of 50 hello worlds (so
counters, histograms and scripts exist), then `--evaluations` hello worlds through
`POST /api/eval`, 64 in flight, until every one is `completed`. Bytes per evaluation is the
growth of Valkey's `used_memory` over them, divided by their number; `MEMORY USAGE` of one
record and its timeline says where it goes. The table then gives evaluations per GiB, and the
sustained rate a retention allows with 4 GiB of `maxmemory` kept below the shed line (80 %).
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import httpx
import redis

from bench.common import HELLO, Stack, print_table, progress, redis_server, stack, write_json
from evaluations.redis_keys import RedisKeys

GIB = 2**30


async def submit_all(running: Stack, count: int, in_flight: int = 64) -> list[str]:
    """`count` hello worlds, `in_flight` at a time; returns once every one is completed."""
    gate = asyncio.Semaphore(in_flight)
    ids: list[str] = []
    async with running.client(limits=httpx.Limits(max_connections=in_flight)) as client:

        async def post() -> None:
            async with gate:
                response = await client.post("/api/eval", json={"code": HELLO})
                response.raise_for_status()
                ids.append(response.json()["eval_id"])

        async def completed() -> int:
            response = await client.get("/api/evaluations", params={"status": "completed", "limit": 1})
            return int(response.json()["total"])

        before = await completed()
        with progress(count, "hello worlds", "eval") as bar:
            sending = asyncio.gather(*(post() for _ in range(count)))
            while (done := await completed() - before) < count:
                bar.update(done - bar.n)
                await asyncio.sleep(0.1)
            await sending
    return ids


def used(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(prog="python -m bench store", description=__doc__)
    parser.add_argument("--evaluations", type=int, default=2000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    with redis_server() as url, stack(url) as running:
        client = redis.Redis.from_url(url, decode_responses=True)
        asyncio.run(submit_all(running, 50))
        before = used(client)
        ids = asyncio.run(submit_all(running, args.evaluations))
        after = used(client)
        keys = RedisKeys(running.namespace)
        sample = ids[len(ids) // 2]
        record = int(client.memory_usage(keys.record(sample)) or 0)
        timeline = int(client.memory_usage(keys.timeline(sample)) or 0)
        client.close()
    per_eval = (after - before) / args.evaluations
    per_gib = GIB / per_eval
    figures: dict[str, object] = {
        "evaluations": args.evaluations,
        "used_memory_delta": after - before,
        "bytes_per_evaluation": round(per_eval),
        "record_bytes": record,
        "timeline_bytes": timeline,
        "evaluations_per_gib": round(per_gib),
    }
    print_table(
        "Redis memory per finished hello world",
        ["evaluations", "used_memory growth", "per evaluation", "record", "timeline", "per GiB"],
        [
            [
                args.evaluations,
                f"{(after - before) / 2**20:.1f} MiB",
                f"{per_eval:.0f} B",
                f"{record} B",
                f"{timeline} B",
                f"{per_gib:,.0f}",
            ]
        ],
    )
    room = 4 * GIB * 0.8
    rows = [[f"{hours} h", f"{room / per_eval / (hours * 3600):,.1f}/s"] for hours in (1, 6, 24, 72)]
    title = "Sustained rate a retention allows (4 GiB maxmemory, shed line 80 %)"
    print_table(title, ["retention", "rate"], rows)
    write_json(args.json, "store", figures)
    return figures


if __name__ == "__main__":
    main()
