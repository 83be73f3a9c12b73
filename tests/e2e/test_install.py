"""Installing the project: quiet, and with its data files (Lua scripts, the dashboard)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

from bench.stack import ROOT

#: The data files the services read from their packages at run time.
DATA_FILES = ("actors/lua/dispatch.lua", "evaluations/lua/status.lua", "app/api/static/dashboard.html")
#: What setuptools said on every install before: `Package 'actors.lua' is absent from the
#: packages configuration` (and for app.lua, app.static), and a notice on each editable one.
NOISE = ("absent from the packages configuration", "SetuptoolsDeprecationWarning", "Editable installation")


#: What a checkout holds that is not the project's source.
LEFT_OUT = (".git", ".venv", "build", "data", "test-artifacts", "*.egg-info", "__pycache__")


def pip(python: str | Path, *argv: str, cwd: Path) -> str:
    done = subprocess.run(
        [str(python), "-m", "pip", *argv], capture_output=True, text=True, timeout=300, cwd=cwd
    )
    assert done.returncode == 0, done.stderr
    return done.stdout + done.stderr


def source_copy(tmp_path: Path) -> Path:
    """The project's files in a folder of their own: a build leaves `build/` and `*.egg-info`
    behind, which must neither land in the checkout nor feed a later build."""
    ignored = shutil.ignore_patterns(*LEFT_OUT)
    return Path(shutil.copytree(ROOT, tmp_path / "source", ignore=ignored))


def test_the_package_builds_without_warnings_and_carries_its_data_files(tmp_path: Path) -> None:
    source = source_copy(tmp_path)
    argv = ("wheel", "--no-deps", "--quiet", "-w", str(tmp_path), str(source))
    said = pip(sys.executable, *argv, cwd=tmp_path)
    assert not [line for line in said.splitlines() if any(noise in line for noise in NOISE)], said
    (wheel,) = tmp_path.glob("crucible-*.whl")
    assert set(DATA_FILES) <= set(zipfile.ZipFile(wheel).namelist())


def test_the_editable_install_dev_makes_is_quiet(tmp_path: Path) -> None:
    """`./dev` installs with `pip install --quiet -e`: nothing but pip's own lines may show
    (this pip, installing into an empty environment of its own)."""
    venv.create(tmp_path / "venv", with_pip=False)
    target = str(tmp_path / "venv" / "bin" / "python")
    argv = ("--python", target, "install", "--quiet", "--no-deps", "-e", str(source_copy(tmp_path)))
    said = pip(sys.executable, *argv, cwd=tmp_path)
    assert not [line for line in said.splitlines() if any(noise in line for noise in NOISE)], said
