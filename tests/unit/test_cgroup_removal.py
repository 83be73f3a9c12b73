"""A run's cgroups that cannot go at once (killed processes leave them a moment later) are
tried again from the event loop, which never waits for them. Plain folders stand in for the
groups: a folder with a file in it refuses `rmdir` as a group with a process in it does."""

from __future__ import annotations

import asyncio
from pathlib import Path

from executor.cgroups import REMOVE_RETRY_S, RunGroup
from executor.cgroups_v1 import V1RunGroup


def busy_group(tmp_path: Path) -> tuple[RunGroup, list[Path]]:
    paths = {name: tmp_path / name for name in ("memory", "pids")}
    for path in paths.values():
        path.mkdir()
        (path / "cgroup.procs").write_text("")  # empty (nothing to kill), but the folder stays
    return V1RunGroup(dict(paths)), list(paths.values())


async def test_a_group_that_cannot_go_yet_goes_later_without_holding_the_loop(tmp_path: Path) -> None:
    group, folders = busy_group(tmp_path)
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(REMOVE_RETRY_S / 2)

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0)
    group.remove()  # returns at once: nothing could go yet
    assert all(folder.exists() for folder in folders)
    for folder in folders:  # the "processes" leave
        (folder / "cgroup.procs").unlink()
    await asyncio.sleep(REMOVE_RETRY_S * 5)
    ticker.cancel()
    assert not any(folder.exists() for folder in folders)
    assert ticks > 3  # the loop kept running meanwhile
