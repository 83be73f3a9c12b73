"""The benchmarks run and print their tables (figures are reported, never asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.stack import ROOT


def test_queue_overhead_prints_a_row_per_system(redis_url: str, tmp_path: Path) -> None:
    out = tmp_path / "queue.json"
    done = subprocess.run(
        [sys.executable, "bench/queue_overhead.py", "--tasks", "50", "--json", str(out)],
        cwd=ROOT, env={**os.environ, "REDIS_URL": redis_url}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line.split()[0] for line in done.stdout.splitlines()[2:]]
    assert rows == ["ours", "dramatiq", "celery"]
    figures = json.loads(out.read_text())["results"]
    assert all(f["tasks_per_s"] > 0 and f["enqueue_per_s"] > 0 for f in figures.values())
