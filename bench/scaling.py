"""Scaling: evaluations/s with 1, 2 and 4 worker processes and 1 and 2 executors.

    .venv/bin/python -m bench scaling --burst 200 [--json out.json]

Each configuration is a fresh stack on the same Redis; a burst of hello-world submissions goes
in at once through the API (as in `bench evaluations`), from the first POST to the last result.
With two executors each has half of EXECUTOR_CONCURRENCY, so the sandbox slots stay the same.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

from bench.common import HELLO, print_table, redis_server, stack, wait_workers, write_json
from bench.evaluations import burst


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="bench scaling", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--burst", type=int, default=200)
    parser.add_argument("--workers", default="1,2,4", help="worker process counts to try")
    parser.add_argument("--executors", default="1,2", help="executor counts to try")
    parser.add_argument("--threads", type=int, default=4, help="threads per worker process")
    parser.add_argument("--slots", type=int, default=8, help="sandbox slots, shared by the executors")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    results: list[dict[str, Any]] = []
    with redis_server() as url:
        for executors in map(int, args.executors.split(",")):
            for workers in map(int, args.workers.split(",")):
                env = {"EXECUTOR_CONCURRENCY": str(max(1, args.slots // executors))}
                with stack(
                    url, workers=workers, threads=args.threads, executors=executors, env=env
                ) as running:
                    wait_workers(url, running.namespace, workers)
                    label = f"{workers} workers, {executors} executors"
                    hello = asyncio.run(burst(running, [HELLO] * args.burst, label))
                    figures = {k: v for k, v in hello.items() if k in ("per_s", "p50", "p95", "p99", "mean")}
                results.append({"workers": workers, "executors": executors, **figures})
    print_table(
        f"scaling: burst of {args.burst} hello-world evaluations, {args.threads} threads per worker process,"
        f" {args.slots} sandbox slots in all",
        ["worker processes", "executors", "evals/s", "p50 ms", "p99 ms"],
        [[r["workers"], r["executors"], r["per_s"], r["p50"], r["p99"]] for r in results],
    )
    write_json(args.json, "scaling", {"burst": args.burst, "results": results})
    return {"results": results}


if __name__ == "__main__":
    main()
