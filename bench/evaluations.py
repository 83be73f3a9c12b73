"""Evaluations: hello-world Python submissions through the HTTP API to stored results, beside
the raw rate of the same sandboxed command run in a loop, and Celery calling the same command.

    .venv/bin/python -m bench evaluations --burst 300 --runs 100 [--json out.json]

- raw: the executor's own `Sandbox` (same bwrap command, limits, cgroups) called in a loop in
  this process, no HTTP, queue or Redis: one run at a time for the single-run time, then
  `--burst` runs in as many loops at once as the stack has worker slots for the rate. This is
  the physical limit: measured with a cold start per run, and with warm (pre-started) sandboxes.
- ours, one at a time: POST /api/eval, then follow /api/eval/{id}/events until `completed`.
- ours, burst: `--burst` submissions sent at once (64 in flight, through aiohttp: the lightest
  client at hand, as it shares the machine); evaluations/s from the first POST to the last
  completion; latency of each from its POST to its stored `completed_at`.
- celery: the same burst through a Celery worker (prefork, as many children as our worker
  slots) whose task calls the same executor service and stores the result in Redis.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import subprocess
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path

import aiohttp
import httpx
import redis

from bench.common import (
    HELLO,
    ROOT,
    Stack,
    delete_namespace,
    percentiles,
    poll_until,
    print_table,
    progress,
    ratio,
    redis_server,
    spawn,
    stack,
    steps,
    wait_workers,
    write_json,
)
from bench.stack import free_uid_base


async def raw_sandbox(runs: int, parallel: int, warm: bool, rate_runs: int) -> dict[str, float]:
    """The sandboxed command alone: `runs` single-run times, then the rate of `rate_runs` runs
    in `parallel` loops (as many as the burst it is compared with); `warm`: with pre-started
    Python sandboxes (executor/warm.py), else every run cold."""
    from evaluations.logs import configure_logging
    from evaluations.settings import get_settings
    from executor.app import Executor, open_sandbox

    configure_logging("WARNING", "json")  # the executor's per-run lines would drown the table
    settings = dataclasses.replace(get_settings(), sandbox_warm_pool=warm, sandbox_uid_base=free_uid_base())
    async with open_sandbox(settings) as sandbox:
        executor = Executor(settings, sandbox)
        limits, python = executor.limits({}), executor.languages["python"]

        async def run(name: str) -> float:
            started = time.perf_counter()
            result = await sandbox.run(name, python, HELLO, limits)
            assert result.status == "completed", result
            return (time.perf_counter() - started) * 1000

        single = [await run(f"raw-{n}") for n in steps(runs, "raw, one at a time")]
        per_loop = max(1, rate_runs // parallel)
        bar = progress(per_loop * parallel, f"raw, {parallel} loops", "run")

        async def loop(k: int) -> None:
            for n in range(per_loop):
                await run(f"raw-{k}-{n}")
                bar.update()

        started = time.perf_counter()
        await asyncio.gather(*(loop(k) for k in range(parallel)))
        elapsed = time.perf_counter() - started
        bar.close()
    return {"per_s": per_loop * parallel / elapsed, **percentiles(single)}


async def follow(client: httpx.AsyncClient) -> float:
    """One submission, from POST to its `completed` event, in ms."""
    started = time.perf_counter()
    eval_id = (await client.post("/api/eval", json={"code": HELLO})).raise_for_status().json()["eval_id"]
    async with client.stream("GET", f"/api/eval/{eval_id}/events") as response:
        async for line in response.aiter_lines():
            if line.startswith("data: ") and json.loads(line[6:])["status"] == "completed":
                return (time.perf_counter() - started) * 1000
    raise RuntimeError(f"{eval_id} did not complete")


async def one_at_a_time(running: Stack, runs: int) -> dict[str, float]:
    async with running.client() as client:
        await follow(client)  # warm-up: connections open, interpreter caches hot
        latencies = [await follow(client) for _ in steps(runs, "ours, one at a time")]
    return percentiles(latencies)


async def burst(running: Stack, count: int, in_flight: int = 64) -> dict[str, float]:
    """`count` submissions at once; rate from the first POST to the last completion."""
    limits = httpx.Limits(max_connections=in_flight)
    async with running.client(limits=limits) as client:
        await follow(client)
        gate = asyncio.Semaphore(in_flight)
        sent: dict[str, float] = {}

        # The POSTs go through aiohttp: a third of httpx's CPU a request, and this client
        # shares the machine with the stack it measures (Celery's sender is a separate process).
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=in_flight), headers=dict(client.headers)
        )

        async def post() -> None:
            async with gate:
                at = time.time()
                async with session.post(f"{running.api}/api/eval", json={"code": HELLO}) as response:
                    response.raise_for_status()
                    sent[(await response.json())["eval_id"]] = at

        async def completed_total() -> int:
            response = await client.get("/api/evaluations", params={"status": "completed", "limit": 1})
            return int(response.json()["total"])

        before = await completed_total()  # the warm-up, and whatever ran before in this stack

        async def completed() -> int:
            return await completed_total() - before

        first = time.time()
        with progress(count, f"ours, burst of {count}", "eval") as bar:
            sending = asyncio.gather(*(post() for _ in range(count)))
            while (done := await completed()) < count:
                bar.update(done - bar.n)
                await asyncio.sleep(0.05)
            await sending
        elapsed = time.time() - first
        await session.close()

        async def latency(eval_id: str) -> float:
            async with gate:
                record = (await client.get(f"/api/eval/{eval_id}")).json()
            if not record.get("completed_at"):
                raise RuntimeError(f"{eval_id} has no result: {record}")
            return (datetime.fromisoformat(record["completed_at"]).timestamp() - sent[eval_id]) * 1000

        latencies = await asyncio.gather(*(latency(e) for e in sent))
    return {"per_s": count / elapsed, **percentiles(latencies)}


def celery_burst(running: Stack, count: int, slots: int) -> dict[str, float]:
    """The same burst through Celery calling the same executor service."""
    namespace = f"bench-celery-{uuid.uuid4().hex[:6]}"
    key = f"{namespace}:done"
    env = {"BENCH_REDIS_URL": running.url, "BENCH_NAMESPACE": namespace,
           "EXECUTOR_SERVICE_URL": running.executors[0], "EXECUTOR_SECRET": running.secret}  # fmt: skip
    argv = [sys.executable, "-m", "celery", "-A", "bench.celery_tasks", "worker", "-c", str(slots),
            "-P", "prefork", "--without-gossip", "--without-mingle", "--without-heartbeat"]  # fmt: skip
    send = (
        "import sys, time; from bench.celery_tasks import evaluate\n"
        "for n in range(int(sys.argv[1])):\n"
        "    evaluate.delay(f'celery-{n}', sys.argv[2], time.time(), sys.argv[3])"
    )
    client = redis.Redis.from_url(running.url)
    try:
        with spawn("bench-celery", argv, env):
            subprocess.run([sys.executable, "-c", send, "1", HELLO, key], cwd=ROOT, env={**os.environ, **env},
                           check=True)  # fmt: skip
            poll_until(lambda: int(client.get(key) or 0), 1, "celery warm-up", timeout=120)
            client.delete(key, f"{key}:latency_ms")
            first = time.time()
            subprocess.run([sys.executable, "-c", send, str(count), HELLO, key], cwd=ROOT,
                           env={**os.environ, **env}, check=True)  # fmt: skip
            poll_until(lambda: int(client.get(key) or 0), count, f"celery, burst of {count}")
            elapsed = time.time() - first
            latencies = [float(x) for x in client.lrange(f"{key}:latency_ms", 0, -1)]
    finally:
        client.close()
        delete_namespace(running.url, namespace)
    return {"per_s": count / elapsed, **percentiles(latencies)}


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(
        prog="bench evaluations", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=100, help="one-at-a-time runs (latency)")
    parser.add_argument("--burst", type=int, default=300, help="submissions sent at once")
    parser.add_argument("--workers", type=int, default=2, help="worker processes")
    parser.add_argument("--threads", type=int, default=4, help="threads per worker process")
    parser.add_argument("--no-celery", action="store_true", help="skip the Celery comparison")
    warm_help = "the stack's executor with pre-started Python sandboxes (SANDBOX_WARM_POOL)"
    parser.add_argument("--warm", choices=("on", "off"), default="on", help=warm_help)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    slots = args.workers * args.threads
    figures: dict[str, dict[str, float]] = {}
    figures["raw_cold"] = asyncio.run(raw_sandbox(args.runs, slots, warm=False, rate_runs=args.burst))
    figures["raw_warm"] = asyncio.run(raw_sandbox(args.runs, slots, warm=True, rate_runs=args.burst))
    env = {"SANDBOX_WARM_POOL": args.warm}
    with redis_server() as url, stack(url, workers=args.workers, threads=args.threads, env=env) as running:
        wait_workers(url, running.namespace, args.workers)
        figures["ours_one_at_a_time"] = asyncio.run(one_at_a_time(running, args.runs))
        figures["ours_burst"] = asyncio.run(burst(running, args.burst))
        if not args.no_celery:
            figures["celery_burst"] = celery_burst(running, args.burst, slots)
    cold, warm = figures["raw_cold"], figures["raw_warm"]
    rows = [
        [f"raw sandboxed run, cold start, {args.runs} one at a time", "-", *_ms(cold)],
        [f"raw sandboxed runs, cold start, {args.burst} in {slots} loops", cold["per_s"], "-", "-", "-"],
        [f"raw sandboxed run, warm sandbox, {args.runs} one at a time", "-", *_ms(warm)],
        [f"raw sandboxed runs, warm sandboxes, {args.burst} in {slots} loops", warm["per_s"], "-", "-", "-"],
        [f"ours, {args.runs} one at a time (HTTP, queue, sandbox)", "-", *_ms(figures["ours_one_at_a_time"])],
        [f"ours, burst of {args.burst}", figures["ours_burst"]["per_s"], *_ms(figures["ours_burst"])],
    ]
    if "celery_burst" in figures:
        c = figures["celery_burst"]
        rows.append([f"celery calling the same executor, burst of {args.burst}", c["per_s"], *_ms(c)])
    print_table(
        f"evaluations: hello-world Python, {args.workers} worker processes x {args.threads} threads,"
        f" 1 executor, warm sandboxes {args.warm}",
        ["path", "evals/s", "p50 ms", "p95 ms", "p99 ms"],
        rows,
    )
    ours, one = figures["ours_burst"], figures["ours_one_at_a_time"]
    mode, same = ("warm", warm) if args.warm == "on" else ("cold", cold)
    print(f"ours burst / raw rate ({mode}): {ratio(ours['per_s'], same['per_s'])}, "
          f"/ raw cold rate: {ratio(ours['per_s'], cold['per_s'])} (target >= 0.80x)")  # fmt: skip
    print(
        f"ours p50 one at a time / raw cold single run p50: {ratio(one['p50'], cold['p50'])} (target <= 2x)"
    )
    if "celery_burst" in figures:
        print(f"ours burst / celery burst: {ratio(ours['per_s'], figures['celery_burst']['per_s'])}")
    write_json(args.json, "evaluations", {"workers": args.workers, "threads": args.threads, "warm": args.warm,
                                          **figures})  # fmt: skip
    return figures


def _ms(f: dict[str, float]) -> list[float]:
    return [f["p50"], f["p95"], f["p99"]]


if __name__ == "__main__":
    main()
