"""Evaluations: what a run costs through the whole stack, against two anchors and a harness.

    .venv/bin/python -m bench evaluations [--burst 300] [--runs 100] [--programs 120] [--json out.json]

Anchors (no HTTP, queue or Redis):
- floor: the simplest isolating sandbox, `bwrap --ro-bind /usr /usr ... --unshare-all
  --die-with-parent --new-session python3 -c "print('Hello')"`, in a loop (one at a time for
  the single-run time, then on 2 threads, one per core, for the rate);
- raw: the executor's own `Sandbox` (same command, limits, cgroups, seccomp) in this process,
  every run cold, and forked from fork servers (`executor/fork_server.py`), in as many loops
  as the stack has worker slots.
Through the stack (fork servers as `--forks` says):
- ours, one at a time: POST /api/eval, then follow /api/eval/{id}/events until `completed`;
- ours, burst: `--burst` submissions at once (64 in flight, through aiohttp: the lightest client
  at hand, as it shares the machine); evaluations/s from the first POST to the last completion;
  latency of each from its POST to its stored `completed_at`;
- workload: `--programs` "function + unit tests" programs (bench/workload.py; some passing,
  some failing, some slow), all at once, against a local unsandboxed harness that forks one
  `python3 program.py` per program on 4 threads, as benchmark harnesses do;
- celery: the same burst through a Celery worker (prefork, as many children as our worker
  slots) whose task calls the same executor service and stores the result in Redis.
CPU per evaluation by process (bench/cpu.py) is read for the burst and the workload.
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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import aiohttp
import httpx
import redis

from bench import cpu
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
from bench.workload import Program, programs

#: The floor's sandbox: the simplest isolating bwrap command line (issue 19's).
FLOOR_ARGS = ("--ro-bind", "/usr", "/usr", "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64",
              "--symlink", "usr/bin", "/bin", "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp",
              "--unshare-all", "--die-with-parent", "--new-session")  # fmt: skip
FLOOR_PROGRAM = ("/usr/bin/python3", "-c", "print('Hello')")
#: One-line runs, passing and failing, whose mean cost the raw figures give.
ONE_LINERS = 30
#: Terminal statuses the workload's programs end in.
JUDGED = ("completed", "failed")


@contextmanager
def floor_run() -> Iterator[Callable[..., float]]:
    """One bare-bwrap floor run, timed in ms (bwrap staged where it can run)."""
    import tempfile

    from executor.app import stage_bwrap

    with tempfile.TemporaryDirectory(prefix="bench-bwrap-") as staged:
        argv = [str(stage_bwrap(Path(staged))), *FLOOR_ARGS, *FLOOR_PROGRAM]

        def once(_: object = None) -> float:
            started = time.perf_counter()
            done = subprocess.run(argv, capture_output=True, check=True)
            assert done.stdout == b"Hello\n", done
            return (time.perf_counter() - started) * 1000

        yield once


def floor(runs: int, rate_runs: int, threads: int = 2) -> dict[str, float]:
    """The bare-bwrap floor: `runs` single runs, then `rate_runs` on `threads` threads."""
    from concurrent.futures import ThreadPoolExecutor

    with floor_run() as once:
        single = [once() for _ in steps(runs, "floor, one at a time")]
        bar = progress(rate_runs, f"floor, {threads} threads", "run")
        busy = cpu.machine_cpu_s()
        started = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            for _ in pool.map(once, range(rate_runs)):
                bar.update()
        elapsed = time.perf_counter() - started
        busy = cpu.machine_cpu_s() - busy
        bar.close()
    return {"per_s": rate_runs / elapsed, **percentiles(single), "machine_cpu_ms": busy * 1000 / rate_runs}


def local_harness(workload: list[Program], threads: int = 4) -> dict[str, float]:
    """The workload as benchmark harnesses run it: one unsandboxed `python3 program.py` forked per
    program, `threads` at a time; wall time for all, and how many passed."""
    import tempfile
    from concurrent.futures import ThreadPoolExecutor

    with tempfile.TemporaryDirectory(prefix="bench-harness-") as folder:
        paths = []
        for n, program in enumerate(workload):
            path = Path(folder) / f"p{n}" / "main.py"
            path.parent.mkdir()
            path.write_text(program.code)
            paths.append(path)

        def judge(path: Path) -> bool:
            done = subprocess.run(
                ["/usr/bin/python3", str(path)], capture_output=True, timeout=60, cwd=path.parent
            )
            return done.returncode == 0

        bar = progress(len(paths), f"local harness, {threads} threads", "program")
        started = time.perf_counter()
        passed = 0
        with ThreadPoolExecutor(threads) as pool:
            for ok in pool.map(judge, paths):
                passed += ok
                bar.update()
        elapsed = time.perf_counter() - started
        bar.close()
    return {"wall_s": elapsed, "passed": passed}


async def raw_sandbox(runs: int, parallel: int, forks: bool, rate_runs: int) -> dict[str, float]:
    """The sandboxed command alone: `runs` single-run times, then the rate of `rate_runs` runs
    in `parallel` loops (as many as the burst it is compared with); `forks`: forked from fork
    servers (executor/fork_server.py), else every run cold."""
    from executor.app import Executor, open_sandbox, request_limits
    from infra.logs import configure_logging
    from infra.settings import get_settings

    configure_logging("WARNING", "json")  # the executor's per-run lines would drown the table
    settings = dataclasses.replace(
        get_settings(), sandbox_fork_server=forks, sandbox_uid_base=free_uid_base()
    )
    async with open_sandbox(settings) as sandbox:
        for _ in range(200):  # the servers start in the background
            if not forks or sandbox.fork_servers == sandbox.capacity:
                break
            await asyncio.sleep(0.05)
        executor = Executor(settings, sandbox)
        limits, python = request_limits(executor.settings), executor.languages["python"]

        async def run(name: str) -> float:
            started = time.perf_counter()
            result = await sandbox.run(name, python, HELLO, limits)
            assert result.status == "completed", result
            return (time.perf_counter() - started) * 1000

        mode = "forked" if forks else "cold"
        single = [await run(f"raw-{n}") for n in steps(runs, f"raw {mode}, one at a time")]
        per_loop = max(1, rate_runs // parallel)
        bar = progress(per_loop * parallel, f"raw {mode}, {parallel} loops", "run")

        async def loop(k: int) -> None:
            for n in range(per_loop):
                await run(f"raw-{k}-{n}")
                bar.update()

        started = time.perf_counter()
        await asyncio.gather(*(loop(k) for k in range(parallel)))
        elapsed = time.perf_counter() - started
        bar.close()
        costs = {}
        for kind, code in (("pass", "print(1)"), ("fail", "1/0")):  # a failure costs no more
            results = [await sandbox.run(f"{kind}-{n}", python, code, limits) for n in range(ONE_LINERS)]
            costs[f"{kind}_cpu_ms"] = sum(r.cpu_ms for r in results) / ONE_LINERS
            costs[f"{kind}_runtime_ms"] = sum(r.runtime_ms for r in results) / ONE_LINERS
    return {"per_s": per_loop * parallel / elapsed, **percentiles(single), **costs}


async def follow(client: httpx.AsyncClient) -> float:
    """One submission, from POST to its `completed` event, in ms."""
    started = time.perf_counter()
    eval_id = (await client.post("/api/eval", json={"code": HELLO})).raise_for_status().json()["eval_id"]
    async with client.stream("GET", f"/api/eval/{eval_id}/events") as response:
        async for line in response.aiter_lines():
            if line.startswith("data: ") and json.loads(line[6:]).get("status") == "completed":
                return (time.perf_counter() - started) * 1000
    raise RuntimeError(f"{eval_id} did not complete")


async def one_at_a_time(running: Stack, runs: int) -> dict[str, dict[str, float]]:
    """`runs` submissions one at a time, each beside one floor run (alternating, so both see
    the same moments of a machine whose speed drifts): {"ours": ..., "floor": ...} in ms."""
    ours, bare = [], []
    with floor_run() as once:
        async with running.client() as client:
            await follow(client)  # warm-up: connections open, interpreter caches hot
            for _ in steps(runs, "ours and the floor, one at a time, alternating"):
                bare.append(once())
                ours.append(await follow(client))
    return {"ours": percentiles(ours), "floor": percentiles(bare)}


async def burst(running: Stack, codes: list[str], label: str, in_flight: int = 64) -> dict[str, object]:
    """Every code at once; rate from the first POST to the last judged result, latency of each
    from its POST to its stored `completed_at`, CPU per evaluation by process, and the records."""
    limits = httpx.Limits(max_connections=in_flight)
    count = len(codes)
    async with running.client(limits=limits) as client:
        await follow(client)
        gate = asyncio.Semaphore(in_flight)
        sent: dict[str, float] = {}

        # The POSTs go through aiohttp: a third of httpx's CPU a request, and this client
        # shares the machine with the stack it measures (Celery's sender is a separate process).
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=in_flight), headers=dict(client.headers)
        )

        async def post(code: str) -> None:
            async with gate:
                at = time.time()
                async with session.post(f"{running.api}/api/eval", json={"code": code}) as response:
                    response.raise_for_status()
                    sent[(await response.json())["eval_id"]] = at

        async def judged_total() -> int:
            totals = 0
            for status in JUDGED:
                response = await client.get("/api/evaluations", params={"status": status, "limit": 1})
                totals += int(response.json()["total"])
            return totals

        before = await judged_total()  # the warm-up, and whatever ran before in this stack
        cpu_before = cpu.snapshot(running.pids)
        first = time.time()
        with progress(count, label, "eval") as bar:
            sending = asyncio.gather(*(post(code) for code in codes))
            while (done := await judged_total() - before) < count:
                bar.update(done - bar.n)
                await asyncio.sleep(0.05)
            await sending
        elapsed = time.time() - first
        cpu_after = cpu.snapshot(running.pids)
        await session.close()

        async def record(eval_id: str) -> dict[str, object]:
            async with gate:
                found = (await client.get(f"/api/eval/{eval_id}")).json()
            if not found.get("completed_at"):
                raise RuntimeError(f"{eval_id} has no result: {found}")
            found["latency_ms"] = (
                datetime.fromisoformat(found["completed_at"]).timestamp() - sent[eval_id]
            ) * 1000
            return dict(found)

        records = await asyncio.gather(*(record(e) for e in sent))
    latencies = [float(r["latency_ms"]) for r in records]  # type: ignore[arg-type]
    return {"per_s": count / elapsed, "wall_s": elapsed, **percentiles(latencies),
            "cpu_ms_per_eval": cpu.per_run_ms(cpu_before, cpu_after, count), "records": records}  # fmt: skip


def workload_figures(result: dict[str, object], workload: list[Program]) -> dict[str, float]:
    """The stack's workload run summed up: wall time, passes, and the mean CPU and wall time
    the sandbox reported for passing and for failing programs."""
    records = result["records"]
    assert isinstance(records, list)
    passes = {p.code: p.passes for p in workload}
    passing = [r for r in records if passes[r["code"]]]
    failing = [r for r in records if not passes[r["code"]]]

    def mean(rows: list[dict[str, object]], field: str) -> float:
        values = [float(r.get(field) or 0) for r in rows]  # type: ignore[arg-type]
        return sum(values) / len(values) if values else float("nan")

    return {
        "wall_s": float(result["wall_s"]),  # type: ignore[arg-type]
        "passed": sum(r["status"] == "completed" for r in records),
        "passing_cpu_ms": mean(passing, "cpu_ms"),
        "failing_cpu_ms": mean(failing, "cpu_ms"),
        "passing_runtime_ms": mean(passing, "runtime_ms"),
        "failing_runtime_ms": mean(failing, "runtime_ms"),
    }


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


def main(argv: list[str] | None = None) -> dict[str, dict[str, object]]:
    parser = argparse.ArgumentParser(
        prog="bench evaluations", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=100, help="one-at-a-time runs (latency)")
    parser.add_argument("--burst", type=int, default=300, help="hello-world submissions sent at once")
    parser.add_argument("--programs", type=int, default=120, help="programs in the workload")
    parser.add_argument("--workers", type=int, default=2, help="worker processes")
    parser.add_argument("--threads", type=int, default=4, help="threads per worker process")
    parser.add_argument("--no-celery", action="store_true", help="skip the Celery comparison")
    forks_help = "the stack's executor with Python fork servers (SANDBOX_FORK_SERVER)"
    parser.add_argument("--forks", choices=("on", "off"), default="on", help=forks_help)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    slots = args.workers * args.threads
    workload = programs(args.programs)
    figures: dict[str, dict[str, object]] = {}
    figures["floor"] = floor(args.runs, args.burst)
    figures["raw_cold"] = asyncio.run(raw_sandbox(args.runs, slots, forks=False, rate_runs=args.burst))
    figures["raw_forked"] = asyncio.run(raw_sandbox(args.runs, slots, forks=True, rate_runs=args.burst))
    figures["local_harness"] = local_harness(workload)
    env = {"SANDBOX_FORK_SERVER": args.forks}
    with redis_server() as url, stack(url, workers=args.workers, threads=args.threads, env=env) as running:
        wait_workers(url, running.namespace, args.workers)
        alternating = asyncio.run(one_at_a_time(running, args.runs))
        figures["ours_one_at_a_time"], figures["floor_alongside"] = alternating["ours"], alternating["floor"]
        hello = asyncio.run(burst(running, [HELLO] * args.burst, f"ours, burst of {args.burst}"))
        work = asyncio.run(burst(running, [p.code for p in workload], f"ours, {args.programs} programs"))
        if not args.no_celery:
            figures["celery_burst"] = celery_burst(running, args.burst, slots)
    figures["ours_burst"] = {k: v for k, v in hello.items() if k != "records"}
    figures["ours_workload"] = {
        **workload_figures(work, workload),
        "cpu_ms_per_eval": work["cpu_ms_per_eval"],
    }
    report(args, figures, slots)
    shape = {"workers": args.workers, "threads": args.threads, "forks": args.forks}
    write_json(args.json, "evaluations", {**shape, **figures})
    return figures


def report(args: argparse.Namespace, figures: dict[str, dict[str, object]], slots: int) -> None:
    """The tables, and the ratios issue 19 sets targets for."""
    f = {
        name: {k: v for k, v in values.items() if isinstance(v, float | int)}
        for name, values in figures.items()
    }
    names = ("floor", "raw_cold", "raw_forked", "ours_one_at_a_time", "ours_burst")
    floor_, cold, forked, one, hello = (f[k] for k in names)
    rows = [
        [f"floor: bare bwrap, {args.runs} one at a time", "-", *_ms(floor_)],
        [f"floor: bare bwrap, {args.burst} on 2 threads", floor_["per_s"], "-", "-", "-"],
        [f"raw sandbox, cold, {args.runs} one at a time", "-", *_ms(cold)],
        [f"raw sandbox, cold, {args.burst} in {slots} loops", cold["per_s"], "-", "-", "-"],
        [f"raw sandbox, forked, {args.runs} one at a time", "-", *_ms(forked)],
        [f"raw sandbox, forked, {args.burst} in {slots} loops", forked["per_s"], "-", "-", "-"],
        [f"ours, {args.runs} one at a time (HTTP, queue, sandbox)", "-", *_ms(one)],
        [f"floor, {args.runs} one at a time, alternating with ours", "-", *_ms(f["floor_alongside"])],
        [f"ours, burst of {args.burst}", hello["per_s"], *_ms(hello)],
    ]
    if "celery_burst" in f:
        c = f["celery_burst"]
        rows.append([f"celery calling the same executor, burst of {args.burst}", c["per_s"], *_ms(c)])
    print_table(
        f"evaluations: hello-world Python, {args.workers} worker processes x {args.threads} threads,"
        f" 1 executor, fork servers {args.forks}",
        ["path", "evals/s", "p50 ms", "p95 ms", "p99 ms"],
        rows,
    )
    local, work = f["local_harness"], f["ours_workload"]
    print_table(
        f"workload: {args.programs} function + unit tests programs",
        ["path", "wall s", "passed", "pass cpu ms", "fail cpu ms"],
        [
            ["local harness, unsandboxed, 4 threads", local["wall_s"], local["passed"], "-", "-"],
            [
                "ours, whole stack",
                work["wall_s"],
                work["passed"],
                work["passing_cpu_ms"],
                work["failing_cpu_ms"],
            ],
            ["raw sandbox, cold: print(1) / 1/0", "-", "-", cold["pass_cpu_ms"], cold["fail_cpu_ms"]],
            ["raw sandbox, forked: print(1) / 1/0", "-", "-", forked["pass_cpu_ms"], forked["fail_cpu_ms"]],
        ],
    )
    per_eval = {name: figures[name]["cpu_ms_per_eval"] for name in ("ours_burst", "ours_workload")}
    roles = [*cpu.ROLES, "other", "total"]
    print_table(
        "CPU ms per evaluation, by process",
        ["scenario", *roles],
        [[name, *(float(per_eval[name][r]) for r in roles)] for name in per_eval],  # type: ignore[index]
    )
    burst_cpu = figures["ours_burst"]["cpu_ms_per_eval"]
    assert isinstance(burst_cpu, dict)
    print(f"machine CPU ms a run: floor {floor_['machine_cpu_ms']:.1f}, ours {burst_cpu['total']:.1f}")
    print(f"ours burst / floor rate: {ratio(hello['per_s'], floor_['per_s'])} (target >= 1.0x)")
    beside = f["floor_alongside"]
    print(
        f"ours p50 one at a time / floor p50, alternating: {ratio(one['p50'], beside['p50'])} (target <= 1x)"
    )
    print(
        f"ours workload wall / local harness wall: {ratio(work['wall_s'], local['wall_s'])} (target <= 1.0x)"
    )
    if "celery_burst" in f:
        print(f"ours burst / celery burst: {ratio(hello['per_s'], f['celery_burst']['per_s'])}")


def _ms(f: dict[str, float]) -> list[float]:
    return [f["p50"], f["p95"], f["p99"]]


if __name__ == "__main__":
    main()
