"""Installing the project: quiet, and with its data files (Lua scripts, the dashboard)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from bench.stack import ROOT

#: The data files the services read from their packages at run time.
DATA_FILES = ("actors/lua/dispatch.lua", "evaluations/lua/status.lua", "app/static/dashboard.html")


def test_the_package_builds_without_warnings_and_carries_its_data_files(tmp_path: Path) -> None:
    """setuptools warned `Package 'actors.lua' is absent from the packages configuration` (and
    for app.lua, app.static) about a hundred lines long on every install."""
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    said = done.stdout + done.stderr
    assert "absent from the packages configuration" not in said and "SetuptoolsDeprecationWarning" not in said
    (wheel,) = tmp_path.glob("crucible-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert set(DATA_FILES) <= names
