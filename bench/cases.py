"""Test cases: one submission carrying N cases against N separate submissions of the same
program and inputs, in Python and in C (with its compile).

    .venv/bin/python -m bench cases [--cases 50] [--json out.json]

For each language, through the HTTP API to the stored result:
- cases: one submission with `--cases` test cases (stdin, expected output; the executor
  compiles once, then forks each case from its fork server and checks its output);
- separate: `--cases` plain submissions of the same program, one per input (stdin), sent one
  after another, each followed to its stored result before the next is sent. One at a time
  because a submission's cases run one after another on one sandbox slot: so both hold one
  slot at a time, wall time per case compares like with like, and neither gets cores the other
  does not.
Each is timed from its first POST to its last stored result (followed on its event stream,
then read), and the machine's CPU over that time is split by process (bench/cpu.py); both are
reported per case. The target: a case costs at most 0.5 x a separate submission's machine CPU.

Each measurement's program carries a fresh comment, so its compile is not in the executor's
compile cache yet: the C cases submission compiles once (its result's `compile` says so);
of the separate C submissions the first compiles and the others hit the cache (counted from
the executor's `/health`), which is what separate submissions of one program cost today.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from bench import cpu
from bench.common import Stack, print_table, progress, redis_server, stack, wait_workers, write_json
from evaluations.status import TERMINAL

#: A case may cost at most this share of a separate submission's machine CPU.
TARGET = 0.5
#: CPU seconds a run may take: low enough that 100 cases fit the submission's wall-time bound.
TIMEOUT_S = 2
#: How long the idle stack is watched first: what the machine spends when nothing is submitted.
IDLE_S = 2.0
#: Past this much CPU a second outside the idle stack, the machine's figures carry other work.
BUSY_MS_PER_S = 100.0
MODULUS = 1_000_003
#: Read n, print the sum of squares up to n: a run whose own work is a fraction of a millisecond.
PROGRAMS = {
    "python": "n = int(input())\nprint(sum(i * i for i in range(n + 1)) % 1000003)\n",
    "c": (
        "#include <stdio.h>\n"
        "int main(void) {\n"
        "    long n, s = 0;\n"
        '    if (scanf("%ld", &n) != 1) return 1;\n'
        "    for (long i = 0; i <= n; i++) s = (s + i * i) % 1000003;\n"
        '    printf("%ld\\n", s);\n'
        "    return 0;\n"
        "}\n"
    ),
}
COMMENT = {"python": "# {}\n", "c": "/* {} */\n"}


def inputs(count: int) -> list[tuple[str, str]]:
    """`count` (stdin, expected output) pairs."""
    values = [1000 + 37 * k for k in range(count)]
    return [(f"{n}\n", f"{sum(i * i for i in range(n + 1)) % MODULUS}\n") for n in values]


def program(language: str) -> str:
    """The language's program with a fresh comment: a source the compile cache has not seen."""
    return PROGRAMS[language] + COMMENT[language].format(f"bench {uuid.uuid4().hex}")


async def settle(client: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, Any]:
    """Submit, follow the event stream to a final status, and read the stored result."""
    response = await client.post("/api/eval", json=body)
    eval_id = response.raise_for_status().json()["eval_id"]
    async with client.stream("GET", f"/api/eval/{eval_id}/events") as events:
        async for line in events.aiter_lines():
            if line.startswith("data: ") and json.loads(line[6:]).get("status") in TERMINAL:
                break
    record: dict[str, Any] = (await client.get(f"/api/eval/{eval_id}")).raise_for_status().json()
    if record["status"] != "completed":
        raise RuntimeError(f"{eval_id} ended {record['status']}: {record.get('error', '')[-500:]}")
    return record


async def executor_health(running: Stack) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=10) as client:
        found: dict[str, Any] = (await client.get(f"{running.executors[0]}/health")).json()
        return found


async def fork_servers_ready(running: Stack, timeout: float = 30) -> None:
    """Until every slot has a fork server ready: each measurement starts from the same state."""
    deadline = time.monotonic() + timeout
    while (health := await executor_health(running))["fork_servers"] < health["capacity"]:
        if time.monotonic() > deadline:
            raise TimeoutError(f"fork servers not ready after {timeout}s: {health['fork_servers']}")
        await asyncio.sleep(0.05)


async def measured(
    running: Stack, bodies: list[dict[str, Any]], cases: int, label: str, unit: str
) -> dict[str, Any]:
    """`bodies` submitted one after another, each to its stored result; wall time and CPU by
    process per case, the records, and the executor's compile cache hits meanwhile."""
    await fork_servers_ready(running)
    async with running.client() as client:
        hits = (await executor_health(running))["compile_cache"]["hits"]
        records = []
        before = cpu.snapshot(running.pids)
        started = time.perf_counter()
        with progress(len(bodies), label, unit) as bar:
            for body in bodies:
                records.append(await settle(client, body))
                bar.update()
        wall_s = time.perf_counter() - started
        after = cpu.snapshot(running.pids)
        hits = (await executor_health(running))["compile_cache"]["hits"] - hits
    return {
        "wall_s": wall_s,
        "wall_ms_per_case": wall_s * 1000 / cases,
        "cpu_ms_per_case": shares(before, after, cases),
        "compile_cache_hits": hits,
        "records": records,
    }


def shares(before: dict[str, float], after: dict[str, float], cases: int) -> dict[str, float]:
    """CPU ms per case by process (`bench.cpu.per_run_ms`), with the stack's own processes
    summed (`stack`), the host's other user processes (`outside`: another job on this machine)
    and the machine's total without them (`ours`: what a quiet host would have spent)."""
    spent = cpu.per_run_ms(before, after, cases)
    outside = (after["outside"] - before["outside"]) * 1000 / cases
    outside = min(max(outside, 0.0), spent["other"])  # a process reaped meanwhile can overcount it
    stack_ms = sum(spent[role] for role in cpu.ROLES)
    return {**spent, "stack": stack_ms, "outside": outside, "ours": spent["total"] - outside}


def case_runs(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each run's own figures: a cases submission's cases, or the separate submissions."""
    return [c for r in records for c in r.get("cases") or [r]]


def mean(rows: list[dict[str, Any]], field: str) -> float:
    return sum(float(r.get(field) or 0) for r in rows) / len(rows) if rows else float("nan")


async def compare(running: Stack, language: str, count: int) -> dict[str, Any]:
    """One language: the cases submission, then the separate submissions, and their ratios."""
    pairs = inputs(count)
    base = {"language": language, "timeout": TIMEOUT_S}
    tests = [{"name": f"n{k}", "stdin": given, "expected_output": want}
             for k, (given, want) in enumerate(pairs)]  # fmt: skip
    one = await measured(running, [{**base, "code": program(language), "tests": tests}], count,
                         f"{language}: 1 submission, {count} cases", "submission")  # fmt: skip
    [result] = one.pop("records")
    if result["verdict"] != "accepted" or result["passed"] != count:
        raise RuntimeError(f"{language} cases: {result['verdict']}, {result['passed']}/{count} passed")
    code = program(language)
    bodies = [{**base, "code": code, "stdin": given} for given, _ in pairs]
    apart = await measured(running, bodies, count, f"{language}: {count} separate submissions", "submission")
    records = apart.pop("records")
    wrong = [r["output"] for r, (_, want) in zip(records, pairs, strict=True) if r["output"] != want]
    if wrong:
        raise RuntimeError(f"{language} separate: {len(wrong)} wrong outputs, e.g. {wrong[0]!r}")
    compiled = result.get("compile")
    one.update(
        verdict=result["verdict"], passed=result["passed"], total=result["total"], compile=compiled,
        compiles=int(bool(compiled) and not compiled["cached"]),
        run_cpu_ms=mean(result["cases"], "cpu_ms"), run_wall_ms=mean(result["cases"], "runtime_ms"),
    )  # fmt: skip
    apart.update(
        passed=count,
        compiles=count - apart["compile_cache_hits"] if compiled else 0,
        run_cpu_ms=mean(case_runs(records), "cpu_ms"), run_wall_ms=mean(case_runs(records), "runtime_ms"),
    )  # fmt: skip
    machine_ratio = one["cpu_ms_per_case"]["total"] / apart["cpu_ms_per_case"]["total"]
    cpu_ratio = one["cpu_ms_per_case"]["ours"] / apart["cpu_ms_per_case"]["ours"]
    stack_ratio = one["cpu_ms_per_case"]["stack"] / apart["cpu_ms_per_case"]["stack"]
    return {
        "compiled": compiled is not None,
        "cases": one,
        "separate": apart,
        "cpu_ratio": cpu_ratio,
        "machine_cpu_ratio": machine_ratio,
        "stack_cpu_ratio": stack_ratio,
        "wall_ratio": one["wall_ms_per_case"] / apart["wall_ms_per_case"],
        "target": TARGET,
        "met": cpu_ratio <= TARGET,
    }


async def idle(running: Stack) -> dict[str, float]:
    """CPU ms per second by process while nothing is submitted (the machine's other work too)."""
    await fork_servers_ready(running)
    before = cpu.snapshot(running.pids)
    await asyncio.sleep(IDLE_S)
    after = cpu.snapshot(running.pids)
    return {role: ms / IDLE_S for role, ms in shares(before, after, 1).items()}


async def run_all(running: Stack, languages: list[str], count: int) -> dict[str, Any]:
    async with running.client() as client:  # warm-up: connections, caches, the compiler's files
        for language in languages:
            given, want = inputs(1)[0]
            warm = {"language": language, "timeout": TIMEOUT_S, "code": program(language)}
            await settle(client, {**warm, "stdin": given})
            await settle(client, {**warm, "tests": [{"stdin": given, "expected_output": want}]})
    figures: dict[str, Any] = {"idle_cpu_ms_per_s": await idle(running)}
    for language in languages:
        figures[language] = await compare(running, language, count)
    return figures


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="bench cases", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    cases_help = "test cases in the one submission, and separate submissions (at most 100)"
    parser.add_argument("--cases", type=int, default=50, help=cases_help)
    parser.add_argument("--languages", default="python,c", help="languages to compare")
    parser.add_argument("--workers", type=int, default=1, help="worker processes")
    parser.add_argument("--threads", type=int, default=2, help="threads per worker process")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    languages = args.languages.split(",")
    with redis_server() as url, stack(url, workers=args.workers, threads=args.threads) as running:
        wait_workers(url, running.namespace, args.workers)
        figures = asyncio.run(run_all(running, languages, args.cases))
    report(args.cases, languages, figures)
    shape = {"cases": args.cases, "order": "sequential", "workers": args.workers, "threads": args.threads}
    write_json(args.json, "cases", {**shape, **figures})
    return figures


def report(count: int, languages: list[str], figures: dict[str, Any]) -> None:
    """The per-case table, the CPU by process, and the ratios against the target."""
    rows = []
    for language in languages:
        for path, label in (("cases", f"1 submission, {count} cases"), ("separate", f"{count} separate")):
            f = figures[language][path]
            spent = f["cpu_ms_per_case"]
            compiles = f["compiles"] if figures[language]["compiled"] else "-"
            machine = [spent["ours"], spent["total"], spent["stack"]]
            rows.append([language, label, f["wall_ms_per_case"], *machine, f["run_cpu_ms"], f["run_wall_ms"],
                         compiles])  # fmt: skip
    print_table(
        f"cases: per case, {count} cases in one submission against {count} separate submissions of the same"
        " program and inputs, each through the HTTP API to its stored result. The separate ones are sent"
        " one after another: a submission's cases run one after another on one slot, so both hold one"
        " slot at a time. Machine CPU: every core's busy time but this client's (`all`), and without"
        " other jobs' processes on the host (`ours`, the figure the target is for); stack: the stack's"
        " processes alone; run: what each run's own cgroup reported",
        ["language", "path", "wall ms", "machine cpu ms (ours)", "(all)", "stack cpu ms", "run cpu ms",
         "run wall ms", "compiles"],
        rows,
    )  # fmt: skip
    roles = [*cpu.ROLES, "other", "outside", "ours"]
    idle_ms = figures["idle_cpu_ms_per_s"]
    by_role: list[list[object]] = [["idle stack, per second", *(idle_ms[r] for r in roles)]]
    for language in languages:
        for path in ("cases", "separate"):
            spent = figures[language][path]["cpu_ms_per_case"]
            by_role.append([f"{language} {path}", *(spent[r] for r in roles)])
    print_table(
        "machine CPU ms per case, by process (other: the rest of the machine, kernel included;"
        " outside: the part of it other jobs' processes spent; ours = the rest)",
        ["path", *roles],
        by_role,
    )
    if idle_ms["outside"] > BUSY_MS_PER_S:
        busy = idle_ms["outside"]
        print(f"note: other jobs on this host used {busy:.0f} ms CPU/s while the stack was idle:"
              " machine CPU (all) includes their work, (ours) leaves it out")  # fmt: skip
    for language in languages:
        f = figures[language]
        met = "met" if f["met"] else "NOT met"
        print(f"{language}: case / separate submission, machine CPU {f['cpu_ratio']:.2f}x"
              f" (target <= {TARGET}x: {met}; all {f['machine_cpu_ratio']:.2f}x), stack CPU"
              f" {f['stack_cpu_ratio']:.2f}x, wall {f['wall_ratio']:.2f}x")  # fmt: skip
        compiled = f["cases"]["compile"]
        if compiled:
            cached = " (from the cache)" if compiled["cached"] else ""
            print(f"{language}: the cases submission compiled {f['cases']['compiles']} time(s){cached}"
                  f" ({compiled.get('cpu_ms', 0):.1f} ms CPU, {compiled.get('runtime_ms', 0):.1f} ms wall);"
                  f" the {count} separate ones compiled {f['separate']['compiles']} time(s), the other"
                  f" {f['separate']['compile_cache_hits']} hit the executor's compile cache")  # fmt: skip


if __name__ == "__main__":
    main()
