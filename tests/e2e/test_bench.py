"""Every benchmark scenario runs end to end on a real stack and prints its table (figures are
reported, never asserted: they depend on the machine)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.stack import ROOT, free_port


def bench(redis_url: str, tmp_path: Path, scenario: str, *options: str) -> tuple[str, dict[str, Any]]:
    out = tmp_path / f"{scenario}.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", scenario, *options, "--json", str(out)],
        cwd=ROOT, env={**os.environ, "REDIS_URL": redis_url}, capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["scenario"] == scenario
    return done.stdout, figures


def test_queue_overhead_compares_ours_bare_dramatiq_and_celery(redis_url: str, tmp_path: Path) -> None:
    stdout, figures = bench(redis_url, tmp_path, "queue", "--tasks", "50")
    assert set(figures["results"]) == {"ours", "dramatiq", "celery"}
    assert all(f["tasks_per_s"] > 0 and f["enqueue_per_s"] > 0 for f in figures["results"].values())
    assert "vs bare dramatiq" in stdout and "ours / celery" in stdout


def test_evaluations_beside_the_floor_the_raw_sandbox_a_harness_and_celery(
    redis_url: str, tmp_path: Path
) -> None:
    options = ("--runs", "3", "--burst", "10", "--programs", "6")
    stdout, figures = bench(redis_url, tmp_path, "evaluations", *options)
    for path in ("floor", "floor_alongside", "raw_cold", "raw_forked", "ours_one_at_a_time", "ours_burst",
                 "celery_burst"):  # fmt: skip
        assert figures[path]["p50"] > 0, path
    for path in ("floor", "raw_cold", "raw_forked", "ours_burst", "celery_burst"):
        assert figures[path]["per_s"] > 0, path
    # the workload: the same programs pass through the stack as in the local harness
    assert figures["ours_workload"]["passed"] == figures["local_harness"]["passed"] > 0
    assert figures["raw_forked"]["fail_cpu_ms"] > 0 and figures["raw_cold"]["pass_cpu_ms"] > 0
    per_eval = figures["ours_burst"]["cpu_ms_per_eval"]
    assert {"api", "workers", "executor", "sandbox", "valkey", "other"} <= set(per_eval)
    # /proc counts in 10 ms ticks: a 10-run burst can round one process's share to 0, not the machine's
    assert per_eval["total"] > 0 and all(
        per_eval[role] >= 0 for role in ("api", "workers", "executor", "sandbox")
    )
    assert "ours burst / floor rate" in stdout and "local harness" in stdout


def test_api_against_a_bare_endpoint(redis_url: str, tmp_path: Path) -> None:
    stdout, figures = bench(redis_url, tmp_path, "api", "--seconds", "1", "--clients", "4")
    assert figures["bare"]["per_s"] > 0 and figures["ours"]["per_s"] > 0
    assert figures["bare"]["errors"] == figures["ours"]["errors"] == 0
    assert "ours / bare" in stdout


def test_api_load_counts_refused_connections_as_failed_requests() -> None:
    from bench.api import load

    url = f"http://127.0.0.1:{free_port()}/push"  # nothing listens there
    figures = asyncio.run(load(url, {}, clients=2, seconds=0.3, label="nobody"))
    assert figures["errors"] > 0 and figures["per_s"] == 0


def test_priority_high_tasks_jump_the_backlog(redis_url: str, tmp_path: Path) -> None:
    stdout, figures = bench(
        redis_url, tmp_path, "priority", "--backlog", "60", "--high", "3", "--every", "0.1"
    )
    assert figures["high_wait_ms"]["p50"] >= 0 and figures["task_run_ms"]["p50"] > 0
    assert "high p99 wait / one task's run" in stdout


@pytest.mark.parametrize("executors", ["1", "2"])
def test_scaling_runs_each_configuration(redis_url: str, tmp_path: Path, executors: str) -> None:
    _, figures = bench(
        redis_url, tmp_path, "scaling", "--burst", "10", "--workers", "1", "--executors", executors
    )
    [result] = figures["results"]
    assert result["executors"] == int(executors) and result["per_s"] > 0


def test_cases_one_submission_against_separate_ones(redis_url: str, tmp_path: Path) -> None:
    stdout, figures = bench(redis_url, tmp_path, "cases", "--cases", "5")
    for language in ("python", "c"):
        for path in ("cases", "separate"):
            f = figures[language][path]
            assert f["passed"] == 5 and f["wall_ms_per_case"] > 0, (language, path)
            assert f["cpu_ms_per_case"]["total"] > 0 and f["run_cpu_ms"] > 0, (language, path)
        assert figures[language]["cpu_ratio"] > 0 and figures[language]["target"] == 0.5
    c = figures["c"]
    # the cases submission compiles once; of the separate ones the first compiles, the rest hit the cache
    assert c["cases"]["compiles"] == 1 and c["cases"]["compile"]["cached"] is False
    assert c["separate"]["compiles"] == 1 and c["separate"]["compile_cache_hits"] == 4
    assert "machine cpu ms" in stdout and "case / separate submission" in stdout
