"""Supervision when a killed run's processes do not end: the run is answered within a bounded
grace, and what it holds stays out of use until they end.

Inside the sandbox such a process is one stuck in uninterruptible sleep (a security review
queued 768 MB of direct disk reads behind the per-run read cap and held a slot 24 s past a 2 s
time-out). Here a real process plays it: a descendant in its own session, which the kill of
the run's process group does not reach, holding the run's pipes open for a few seconds.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from evaluations.languages import registry
from executor.app import stage_bwrap
from executor.errors import SandboxBusy
from executor.limits import Limits
from executor.outcome import Outcome
from executor.runs import KillMemory, Run
from executor.sandbox import Sandbox
from executor.spawn import Started
from executor.supervise import KILL_GRACE_S, Deadlines, supervise
from infra.settings import Settings

OUTLIVES_S = 4


async def supervised(
    script: str, eval_id: str, wall_s: float
) -> tuple[Run, Outcome, subprocess.Popen[bytes]]:
    """`script` run as a process group of its own (as a sandbox is), supervised to its end."""
    process = subprocess.Popen(
        ["/bin/sh", "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    status_read, status_write = os.pipe()
    os.close(status_write)
    run = Run(eval_id, "python")
    deadlines = Deadlines(wall_s, wall_s)
    outcome = await supervise(run, Started(process, None, status_read), deadlines, (1024, 1024), KillMemory())
    return run, outcome, process


async def test_a_run_whose_processes_outlive_the_kill_is_answered_within_the_grace() -> None:
    began = time.monotonic()
    run, outcome, process = await supervised(f"setsid sleep {OUTLIVES_S} & exec sleep 60", "lingering", 1.0)
    answered = time.monotonic() - began
    assert outcome.timed_out and answered < 1.0 + KILL_GRACE_S + 1.0
    assert run.lingering is not None and not run.lingering.done()  # the slot waits for this
    await asyncio.wait_for(run.lingering, OUTLIVES_S + 5)
    assert process.returncode is not None  # reaped once its holder let go


async def test_a_run_that_ends_at_its_kill_holds_nothing() -> None:
    run, outcome, process = await supervised("exec sleep 60", "ends", 0.5)
    assert outcome.timed_out and run.lingering is None and process.returncode is not None


class _Outliving(Sandbox):
    """Every run's command line is the stand-in above instead of bwrap's (the sandbox itself
    kills a whole pid namespace, so nothing in it escapes a kill but a process stuck in
    uninterruptible sleep)."""

    def command(self, argv: tuple[str, ...], *rest: Any, **options: Any) -> list[str]:
        return ["/bin/sh", "-c", f"setsid sleep {OUTLIVES_S} & exec sleep 60"]


async def test_the_slot_of_such_a_run_stays_out_of_use_until_its_processes_end(tmp_path: Path) -> None:
    settings = Settings.from_env()
    python = registry(settings.python_path)["python"]
    limits = Limits(timeout=1 / 3, memory_mb=256, output_bytes=65536, processes=64, open_files=64,
                    file_size_mb=16, tmpfs_mb=100)  # fmt: skip
    sandbox = _Outliving(stage_bwrap(tmp_path), uid_base=settings.sandbox_uid_base, slots=1,
                         cgroups=None, seccomp=None)  # fmt: skip
    try:
        result = await sandbox.run("held", python, "print(1)", limits)
        assert result.status == "timeout"
        assert sandbox.held == {0: "held"}
        with pytest.raises(SandboxBusy):  # the only slot: its uid still has a live process
            await sandbox.run("next", python, "print(1)", limits)
        await until_released(sandbox)
        assert sandbox.held == {}
        again = await sandbox.run("after", python, "print(1)", limits)  # the slot is free again
        assert again.status == "timeout"
    finally:
        await sandbox.shutdown()
        await until_released(sandbox)  # leave no process of ours behind


async def until_released(sandbox: Sandbox) -> None:
    for _ in range(OUTLIVES_S * 10 + 50):
        if not sandbox.held:
            return
        await asyncio.sleep(0.1)
