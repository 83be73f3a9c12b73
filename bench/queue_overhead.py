"""Queue overhead: N no-op tasks through Crucible's stack, bare Dramatiq and Celery, in one run
on the same Redis and the same machine, with the same worker concurrency.

    .venv/bin/python -m bench queue --tasks 2000            # embedded Valkey
    REDIS_URL=redis://127.0.0.1:6379/0 .venv/bin/python -m bench queue --json out.json

- ours: the production broker and middleware; each task is recorded and enqueued in one Lua call
  (as the API does), then moves queued → running → completed in its record (bench/noop_ours.py).
- dramatiq: Dramatiq's RedisBroker and default middleware, a task that only counts itself.
- celery: Celery on Redis (prefork pool, results ignored), the same task.
Every task ends by incrementing one Redis counter; end to end is from the first enqueue until
the counter reaches N. Enqueue rate is N over the time the sending took.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import redis

from bench.common import (
    ROOT,
    delete_namespace,
    poll_until,
    print_table,
    ratio,
    redis_server,
    spawn,
    write_json,
)


def wait_count(client: redis.Redis, key: str, n: int, label: str, timeout: float = 600) -> None:
    poll_until(lambda: int(client.get(key) or 0), n, label, timeout)


def measure(
    client: redis.Redis, key: str, n: int, label: str, send: Callable[[int], tuple[float, float]]
) -> dict[str, float]:
    """`send(n)` sends n tasks and returns when its first and last send happened (wall clock)."""
    send(1)  # warm-up: the worker is up and every connection is open
    wait_count(client, key, 1, f"{label} warm-up", timeout=120)
    client.delete(key)
    first, last = send(n)
    wait_count(client, key, n, label)
    total = time.time() - first
    return {"enqueue_per_s": n / (last - first), "tasks_per_s": n / total, "seconds": total}


def run_ours(url: str, args: argparse.Namespace, client: redis.Redis) -> dict[str, float]:
    namespace = f"bench-ours-{uuid.uuid4().hex[:6]}"
    env = {"REDIS_URL": url, "CRUCIBLE_NAMESPACE": namespace, "LOG_LEVEL": "WARNING", "LOG_FORMAT": "json"}
    os.environ.update(env)
    from dramatiq.message import Message

    from actors.broker import AsyncEnqueuer
    from evaluations.queue import QUEUE_NAME
    from evaluations.store import EvaluationStore, NewEvaluation
    from infra.redis_client import async_client

    key = f"{namespace}:bench:done"

    def send(n: int) -> tuple[float, float]:
        async def go() -> None:
            aclient = async_client(url)
            store = EvaluationStore(aclient, namespace, retention_seconds=3600)
            enqueuer = AsyncEnqueuer(aclient, namespace)
            gate = asyncio.Semaphore(32)

            async def one() -> None:
                eval_id = f"noop-{uuid.uuid4().hex[:12]}"
                creation = store.creation(NewEvaluation(eval_id, "", "python", 1, "default", False, {}))
                async with gate:  # as the API submits: the record and the message in one Lua call
                    await enqueuer.submit(
                        store.key(eval_id),
                        creation,
                        Message(QUEUE_NAME, "noop", (), {"eval_id": eval_id, "done_key": key}, {}),
                        "default",
                    )

            await asyncio.gather(*(one() for _ in range(n)))
            await aclient.aclose()

        first = time.time()
        asyncio.run(go())
        return first, time.time()

    argv = [sys.executable, "-m", "dramatiq", "bench.noop_ours:main", "--processes", str(args.processes),
            "--threads", str(args.threads)]  # fmt: skip
    try:
        with spawn("bench-ours", argv, env):
            return measure(client, key, args.tasks, "ours", send)
    finally:
        delete_namespace(url, namespace)


def run_library(
    system: str,
    module: str,
    send_call: str,
    worker_argv: list[str],
    url: str,
    args: argparse.Namespace,
    client: redis.Redis,
) -> dict[str, float]:
    """Bare Dramatiq or Celery: start its worker on `module`, send with `send_call` from a child."""
    namespace = f"bench-{system}-{uuid.uuid4().hex[:6]}"
    env = {"BENCH_REDIS_URL": url, "BENCH_NAMESPACE": namespace}
    key = f"{namespace}:done"
    code = (
        f"import sys, os, time; os.environ.update({env!r}); from {module} import noop\n"
        "first = time.time()\n"
        f"for _ in range(int(sys.argv[1])): noop.{send_call}({key!r})\n"
        "print(first, time.time())"
    )
    try:
        with spawn(f"bench-{system}", [sys.executable, "-m", *worker_argv], env):
            return measure(client, key, args.tasks, system, lambda n: _send_in_child(code, n))
    finally:
        delete_namespace(url, namespace)


def run_dramatiq(url: str, args: argparse.Namespace, client: redis.Redis) -> dict[str, float]:
    argv = ["dramatiq", "bench.noop_bare", "--processes", str(args.processes), "--threads", str(args.threads)]
    return run_library("dramatiq", "bench.noop_bare", "send", argv, url, args, client)


def run_celery(url: str, args: argparse.Namespace, client: redis.Redis) -> dict[str, float]:
    slots = str(args.processes * args.threads)
    argv = ["celery", "-A", "bench.celery_tasks", "worker", "-c", slots, "-P", "prefork",
            "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "warning"]  # fmt: skip
    return run_library("celery", "bench.celery_tasks", "delay", argv, url, args, client)


def _send_in_child(code: str, n: int) -> tuple[float, float]:
    """Send from a fresh process, so each system's client library is set up as its users do;
    the child reports when its first and last send happened (its start-up is not counted)."""
    done = subprocess.run(
        [sys.executable, "-c", code, str(n)], cwd=ROOT, check=True, capture_output=True, text=True
    )
    first, last = map(float, done.stdout.split()[-2:])
    return first, last


RUNNERS = {"ours": run_ours, "dramatiq": run_dramatiq, "celery": run_celery}


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(
        prog="bench queue", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--systems", default="ours,dramatiq,celery")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    results: dict[str, dict[str, float]] = {}
    with redis_server() as url:
        client = redis.Redis.from_url(url)
        for system in args.systems.split(","):
            results[system] = RUNNERS[system](url, args, client)
        client.close()
    base = results.get("dramatiq", {}).get("tasks_per_s")
    print_table(
        f"queue overhead: {args.tasks} no-op tasks, {args.processes} worker processes x"
        f" {args.threads} threads (celery: prefork -c {args.processes * args.threads})",
        ["system", "enqueue/s", "tasks/s end to end", "vs bare dramatiq"],
        [
            [s, r["enqueue_per_s"], r["tasks_per_s"], ratio(r["tasks_per_s"], base)]
            for s, r in results.items()
        ],
    )
    if base and "ours" in results and "celery" in results:
        versus = ratio(results["ours"]["tasks_per_s"], results["celery"]["tasks_per_s"])
        print(f"ours / celery: {versus} (target >= 3x); ours / bare dramatiq target >= 0.90x")
    write_json(args.json, "queue", {"tasks": args.tasks, "results": results})
    return results


if __name__ == "__main__":
    main()
