"""`crucible submit`: files in, a progress bar while waiting, results out."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Stack
from tests.helpers import TEST_ADMIN_KEY


@pytest.mark.parametrize("mode", [[], ["--batch"]])
def test_submit_waits_for_every_file_with_a_progress_bar(
    shared_stack: Stack, tmp_path: Path, mode: list[str]
) -> None:
    files = []
    for n, code in enumerate(["print('one')", "print('two')", "raise SystemExit(3)"]):
        files.append(tmp_path / f"prog{n}.py")
        files[-1].write_text(code)
    argv = [sys.executable, "-m", "app.cli", "submit", *map(str, files), "--api", shared_stack.api_url,
            "--api-key", TEST_ADMIN_KEY]  # fmt: skip
    done = subprocess.run([*argv, "--json", *mode], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr  # one program failed
    results = {Path(r["file"]).name: r for r in json.loads(done.stdout)}
    assert results["prog0.py"]["output"] == "one\n" and results["prog1.py"]["output"] == "two\n"
    assert results["prog2.py"]["status"] == "failed" and results["prog2.py"]["exit_code"] == 3
    assert {r["queue"] for r in results.values()} == {"low" if mode else "default"}
    assert "evaluations: 100%" in done.stderr and "3/3" in done.stderr
