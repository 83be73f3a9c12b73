"""Submit → result latency and burst throughput of a stack that is already running (yours),
measured over HTTP the way `bench evaluations` measures the stack it starts itself.

    crucible up                    # in one terminal (or any running stack)
    .venv/bin/python bench/spine.py --api http://127.0.0.1:8080 --api-key "$(cat data/admin.key)"
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script

from bench.common import HELLO, Stack, print_table
from bench.evaluations import burst, one_at_a_time


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--api", default="http://127.0.0.1:8080")
    parser.add_argument("--api-key", required=True, help="an admin key (crucible up prints one)")
    parser.add_argument("--runs", type=int, default=100, help="sequential runs for latency")
    parser.add_argument("--burst", type=int, default=500, help="submissions sent at once")
    args = parser.parse_args()
    running = Stack(url="", namespace="", api=args.api, admin_key=args.api_key, secret="")
    latency = asyncio.run(one_at_a_time(running, args.runs))
    hello = asyncio.run(burst(running, [HELLO] * args.burst, f"burst of {args.burst}"))
    at_once = {k: v for k, v in hello.items() if k != "records"}
    print_table(
        f"hello-world Python through {args.api}",
        ["measure", "evals/s", "p50 ms", "p95 ms", "p99 ms"],
        [
            [f"{args.runs} one at a time", "-", latency["p50"], latency["p95"], latency["p99"]],
            [f"burst of {args.burst}", at_once["per_s"], at_once["p50"], at_once["p95"], at_once["p99"]],
        ],
    )


if __name__ == "__main__":
    main()
