"""Submit → result latency and burst throughput of a running stack, measured over HTTP.

    crucible up                    # in one terminal (or any running stack)
    .venv/bin/python bench/spine.py --api http://127.0.0.1:8080

Latency: hello-world submissions one after another, from sending POST /api/eval to the
`completed` event on /api/eval/{id}/events. Throughput: a burst submitted at once, from the
first POST to the last completion (counted from the completed index).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time

import httpx
from tqdm import tqdm, trange

HELLO = "print('hello world')"


async def one_latency(client: httpx.AsyncClient) -> float:
    started = time.perf_counter()
    eval_id = (await client.post("/api/eval", json={"code": HELLO})).json()["eval_id"]
    async with client.stream("GET", f"/api/eval/{eval_id}/events") as response:
        async for line in response.aiter_lines():
            if line.startswith("data: ") and json.loads(line[6:])["status"] == "completed":
                return time.perf_counter() - started
    raise RuntimeError(f"{eval_id} did not complete")


async def completed_total(client: httpx.AsyncClient) -> int:
    return (await client.get("/api/evaluations", params={"status": "completed", "limit": 1})).json()["total"]


async def burst(client: httpx.AsyncClient, count: int) -> tuple[float, float]:
    before = await completed_total(client)
    started = time.perf_counter()
    semaphore = asyncio.Semaphore(64)

    async def post() -> None:
        async with semaphore:
            response = await client.post("/api/eval", json={"code": HELLO})
            response.raise_for_status()

    await asyncio.gather(*(post() for _ in range(count)))
    submitted = time.perf_counter() - started
    with tqdm(total=count, desc="burst", unit="eval", file=sys.stderr) as bar:
        while (done := await completed_total(client) - before) < count:
            bar.update(done - bar.n)
            await asyncio.sleep(0.05)
        bar.update(count - bar.n)
    return submitted, time.perf_counter() - started


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--api", default="http://127.0.0.1:8080")
    parser.add_argument("--api-key", required=True, help="an admin key (crucible up prints one)")
    parser.add_argument("--runs", type=int, default=100, help="sequential runs for latency")
    parser.add_argument("--burst", type=int, default=500, help="submissions sent at once")
    args = parser.parse_args()
    limits = httpx.Limits(max_connections=100)
    headers = {"x-api-key": args.api_key}
    async with httpx.AsyncClient(base_url=args.api, timeout=120, limits=limits, headers=headers) as client:
        await one_latency(client)  # warm-up
        latencies = [await one_latency(client) for _ in trange(args.runs, desc="latency", file=sys.stderr)]
        submitted, finished = await burst(client, args.burst)
    ms = sorted(x * 1000 for x in latencies)
    print(f"{'measure':<42}{'value':>12}")
    print(f"{'submit->result latency, median (ms)':<42}{statistics.median(ms):>12.1f}")
    print(f"{'submit->result latency, p95 (ms)':<42}{ms[int(len(ms) * 0.95) - 1]:>12.1f}")
    print(f"{'submit->result latency, min / max (ms)':<42}{f'{ms[0]:.1f} / {ms[-1]:.1f}':>12}")
    print(f"{f'burst of {args.burst}: all accepted after (s)':<42}{submitted:>12.2f}")
    print(f"{f'burst of {args.burst}: all completed after (s)':<42}{finished:>12.2f}")
    print(f"{'burst throughput (evaluations/s)':<42}{args.burst / finished:>12.1f}")


if __name__ == "__main__":
    asyncio.run(main())
