"""Priority under backlog: with `--backlog` low and default evaluations queued, how long do high
ones wait?

    .venv/bin/python -m bench priority --backlog 1000 --high 30 [--json out.json]

The backlog (half low through /api/eval-batch, half default through /api/eval) is queued
before any worker runs; then the workers start and, while they drain it, one high submission
(`priority: true`) goes in every `--every` seconds. A high task's wait is from its record's
`created_at` to its `started_at`; with every worker slot busy it should wait at most one
task's run time (the median run of the backlog, from `started_at` to `completed_at`, is
printed beside it).
"""

from __future__ import annotations

import argparse
import asyncio
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from bench.common import (
    HELLO,
    Stack,
    percentiles,
    print_table,
    progress,
    redis_server,
    stack,
    steps,
    wait_workers,
    write_json,
)

#: The endpoint's cap on one batch.
BATCH = 100


def _at(record: dict[str, Any], field: str) -> float:
    return datetime.fromisoformat(record[field]).timestamp() * 1000


def _ms_between(record: dict[str, Any], start: str, end: str) -> float:
    return _at(record, end) - _at(record, start)


async def post(client: httpx.AsyncClient, gate: asyncio.Semaphore, body: dict[str, Any]) -> str:
    async with gate:
        return str((await client.post("/api/eval", json=body)).raise_for_status().json()["eval_id"])


async def queue_backlog(running: Stack, backlog: int) -> tuple[list[str], list[str]]:
    """Half low (through the batch endpoint, which queues low), half default."""
    async with running.client(limits=httpx.Limits(max_connections=32)) as client:
        gate = asyncio.Semaphore(32)

        async def post_batch(count: int) -> list[str]:
            body = {"evaluations": [{"code": HELLO} for _ in range(count)]}
            async with gate:
                response = (await client.post("/api/eval-batch", json=body)).raise_for_status().json()
            return [item["eval_id"] for item in response["evaluations"]]

        lows = backlog // 2
        batches = [post_batch(min(BATCH, lows - start)) for start in range(0, lows, BATCH)]
        low_ids = [i for ids in await asyncio.gather(*batches) for i in ids]
        default_ids = await asyncio.gather(
            *(post(client, gate, {"code": HELLO}) for _ in range(backlog - lows))
        )
        return low_ids, default_ids


async def drain(
    running: Stack, low_ids: list[str], default_ids: list[str], highs: int, every: float
) -> dict[str, Any]:
    """While workers drain the backlog, send high tasks; then read every record."""
    async with running.client(limits=httpx.Limits(max_connections=32)) as client:
        gate = asyncio.Semaphore(32)

        high_ids = []
        for _ in steps(highs, "high submissions"):
            high_ids.append(await post(client, gate, {"code": HELLO, "priority": True}))
            await asyncio.sleep(every)

        async def record(eval_id: str) -> dict[str, Any]:
            while True:
                async with gate:
                    body = (await client.get(f"/api/eval/{eval_id}")).json()
                if body["status"] == "completed":
                    return body
                await asyncio.sleep(0.2)

        everything = [*low_ids, *default_ids, *high_ids]
        bar = progress(len(everything), "draining the backlog", "eval")

        async def tracked(eval_id: str) -> dict[str, Any]:
            body = await record(eval_id)
            bar.update()
            return body

        records = dict(zip(everything, await asyncio.gather(*(tracked(e) for e in everything)), strict=True))
        bar.close()
    high_waits = [_ms_between(records[e], "created_at", "started_at") for e in high_ids]
    runs = [_ms_between(records[e], "started_at", "completed_at") for e in [*low_ids, *default_ids]]
    last_backlog_start = max(_at(records[e], "started_at") for e in [*low_ids, *default_ids])
    # only a high task that started while backlog still waited shows the priority at work
    behind_backlog = sum(_at(records[e], "started_at") < last_backlog_start for e in high_ids)
    return {
        "high_wait_ms": percentiles(high_waits),
        "high_wait_max_ms": max(high_waits),
        "task_run_ms": percentiles(runs),
        "high_started_while_backlog_waited": behind_backlog,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="bench priority", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backlog", type=int, default=1000, help="low + default evaluations queued first")
    parser.add_argument("--high", type=int, default=30, help="high evaluations sent while it drains")
    parser.add_argument("--every", type=float, default=0.2, help="seconds between high submissions")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    with redis_server() as url, stack(url, workers=0) as running:
        low_ids, default_ids = asyncio.run(queue_backlog(running, args.backlog))
        with running.workers(args.workers, args.threads):
            wait_workers(url, running.namespace, args.workers)
            figures = asyncio.run(drain(running, low_ids, default_ids, args.high, args.every))
    w, t = figures["high_wait_ms"], figures["task_run_ms"]
    print_table(
        f"priority: {args.backlog} low + default queued, {args.high} high sent every {args.every}s while it"
        f" drains; {args.workers} worker processes x {args.threads} threads",
        ["measure", "p50 ms", "p99 ms", "max ms"],
        [
            ["high task: wait from submit to start", w["p50"], w["p99"], figures["high_wait_max_ms"]],
            ["one backlog task's run (start to stored result)", t["p50"], t["p99"], "-"],
        ],
    )
    print(
        f"high p99 wait / one task's run (p50): {w['p99'] / t['p50']:.2f}x (target <= 1x); "
        f"{figures['high_started_while_backlog_waited']} of {args.high} high tasks started while the "
        "backlog waited"
    )
    write_json(args.json, "priority", {"backlog": args.backlog, "high": args.high, **figures})
    return figures


if __name__ == "__main__":
    main()
