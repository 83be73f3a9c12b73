"""API: `POST /api/eval` requests/s and latency under concurrent clients, against a bare
Starlette endpoint that only pushes the body to Redis (the floor of what an API can do here).

    .venv/bin/python -m bench api --seconds 10 --clients 32 [--processes 1] [--json out.json]
        [--ha [--min-replicas N]]   (Redis behind Sentinels; the API WAITs for N replicas)

Both run as `--processes` uvicorn processes (`crucible api` with CRUCIBLE_API_PROCESSES) on the
same Redis; no workers run, so every accepted evaluation stays queued. The clients are
keep-alive aiohttp connections in this process; each sends one request after another for
`--seconds` after a short warm-up.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from contextlib import ExitStack
from pathlib import Path

import aiohttp

from bench.common import (
    HELLO,
    delete_namespace,
    free_port,
    percentiles,
    print_table,
    progress,
    ratio,
    redis_server,
    spawn,
    stack,
    wait_http,
    write_json,
)
from bench.ha import ha_redis


async def load(
    url: str, headers: dict[str, str], clients: int, seconds: float, label: str
) -> dict[str, float]:
    """`clients` loops posting a hello-world submission to `url` for `seconds`.

    aiohttp, not httpx, generates the load: it costs a third of the CPU per request, and on
    this machine the load generator shares the cores with the server it measures.
    """
    latencies: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as client:

        async def loop(until: float, keep: bool) -> None:
            nonlocal errors
            while time.perf_counter() < until:
                started = time.perf_counter()
                try:
                    async with client.post(url, json={"code": HELLO}) as response:
                        await response.read()
                except (aiohttp.ClientError, OSError):
                    errors += 1  # a refused or reset connection is a failed request, not the end
                    continue
                if response.status >= 300:
                    errors += 1
                elif keep:
                    latencies.append((time.perf_counter() - started) * 1000)

        warm = time.perf_counter() + 1
        await asyncio.gather(*(loop(warm, keep=False) for _ in range(clients)))
        started = time.perf_counter()
        until = started + seconds
        with progress(int(seconds), label, "s") as bar:
            ticker = asyncio.create_task(_tick(bar, until))
            await asyncio.gather(*(loop(until, keep=True) for _ in range(clients)))
            ticker.cancel()
        elapsed = time.perf_counter() - started
    if errors:
        print(f"{label}: {errors} requests failed", file=sys.stderr)
    return {"per_s": len(latencies) / elapsed, "errors": errors, **percentiles(latencies)}


async def _tick(bar: object, until: float) -> None:
    while time.perf_counter() < until:
        await asyncio.sleep(1)
        bar.update()  # type: ignore[attr-defined]


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(
        prog="bench api", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--processes", type=int, default=1, help="uvicorn processes of each server")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument(
        "--ha", action="store_true", help="Redis as primary, replica, 3 Sentinels; the API follows them"
    )
    parser.add_argument(
        "--min-replicas", type=int, default=0, help="CRUCIBLE_REDIS_MIN_REPLICAS for the API (with --ha)"
    )
    args = parser.parse_args(argv)
    figures: dict[str, dict[str, float]] = {}
    with ExitStack() as servers:
        if args.ha:
            ha = servers.enter_context(ha_redis(replicas=max(args.min_replicas, 1)))
            url = f"redis://127.0.0.1:{ha.primary_port}/0"
            sentinels = {**ha.env(), "CRUCIBLE_REDIS_MIN_REPLICAS": str(args.min_replicas)}
        else:
            url = servers.enter_context(redis_server())
            sentinels = {}
        namespace = f"bench-bare-{uuid.uuid4().hex[:6]}"
        port = free_port()
        argv_bare = [sys.executable, "-m", "uvicorn", "--factory", "bench.bare_endpoint:create_app",
                     "--port", str(port), "--workers", str(args.processes), "--no-access-log",
                     "--log-level", "warning"]  # fmt: skip
        try:
            with spawn(
                "bench-bare-endpoint", argv_bare, {"BENCH_REDIS_URL": url, "BENCH_NAMESPACE": namespace}
            ):
                bare = f"http://127.0.0.1:{port}"
                wait_http(f"{bare}/push", healthy=False)
                figures["bare"] = asyncio.run(load(f"{bare}/push", {}, args.clients, args.seconds, "bare"))
        finally:
            delete_namespace(url, namespace)
        processes = {"CRUCIBLE_API_PROCESSES": str(args.processes), **sentinels}
        with stack(url, workers=0, executors=0, env=processes) as running:
            auth = {"authorization": f"Bearer {running.admin_key}"}
            figures["ours"] = asyncio.run(
                load(f"{running.api}/api/eval", auth, args.clients, args.seconds, "POST /api/eval")
            )
    rows = [
        ["bare Starlette endpoint (one RPUSH)", *_row(figures["bare"])],
        ["ours: POST /api/eval (auth, quota, record + enqueue)", *_row(figures["ours"])],
    ]
    print_table(
        f"API: {args.clients} concurrent keep-alive clients for {args.seconds:.0f} s,"
        f" {args.processes} uvicorn process(es) each",
        ["endpoint", "requests/s", "p50 ms", "p95 ms", "p99 ms", "failed"],
        rows,
    )
    print(f"ours / bare: {ratio(figures['ours']['per_s'], figures['bare']['per_s'])} (target >= 0.70x)")
    setup = {"clients": args.clients, "seconds": args.seconds, "processes": args.processes,
             "ha": args.ha, "min_replicas": args.min_replicas}  # fmt: skip
    write_json(args.json, "api", {**setup, **figures})
    return figures


def _row(f: dict[str, float]) -> list[float]:
    return [f["per_s"], f["p50"], f["p95"], f["p99"], f["errors"]]


if __name__ == "__main__":
    main()
