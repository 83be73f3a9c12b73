"""Sandbox start-up cost: hello-world Python through `POST /execute` against the same command
run bare (no sandbox), measured in one run on this machine.

    EXECUTOR_SECRET=s crucible executor &        # or any running executor
    EXECUTOR_SECRET=s .venv/bin/python bench/sandbox.py --executor http://127.0.0.1:8083 --runs 100
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import httpx

HELLO = "print('hello world')"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--executor", default="http://127.0.0.1:8083")
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--python", default="/usr/bin/python3", help="the interpreter the sandbox uses")
    args = parser.parse_args()
    bare, sandboxed, inside = [], [], []
    headers = {"authorization": f"Bearer {os.environ.get('EXECUTOR_SECRET', '')}"}
    with httpx.Client(base_url=args.executor, timeout=60, headers=headers) as client:
        for n in range(args.runs):
            started = time.perf_counter()
            subprocess.run([args.python, "-u", "-c", HELLO], check=True, capture_output=True)
            bare.append((time.perf_counter() - started) * 1000)
            started = time.perf_counter()
            result = client.post("/execute", json={"eval_id": f"bench-{n}", "code": HELLO}).json()
            sandboxed.append((time.perf_counter() - started) * 1000)
            inside.append(result["runtime_ms"])
            assert result["status"] == "completed", result
            print(f"\r  {n + 1}/{args.runs}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    enforced = client_health(args.executor)
    print(f"{'hello-world Python, median of ' + str(args.runs):<46}{'ms':>8}")
    print(f"{'bare command (no sandbox)':<46}{statistics.median(bare):>8.1f}")
    print(f"{'POST /execute round trip (' + enforced + ')':<46}{statistics.median(sandboxed):>8.1f}")
    print(f"{'  of which the sandboxed run (runtime_ms)':<46}{statistics.median(inside):>8.1f}")
    overhead = statistics.median(sandboxed) - statistics.median(bare)
    print(f"{'sandbox + HTTP overhead over bare':<46}{overhead:>8.1f}")


def client_health(url: str) -> str:
    return httpx.get(f"{url}/health").json()["limits_enforced_by"]


if __name__ == "__main__":
    main()
