"""Per-run memory and process accounting with cgroups, where the machine lets us.

Each run gets a fresh group: the memory limit holds for all its processes together (RLIMIT_AS
is per process), peak memory and OOM kills are read back exactly, `pids` caps processes, and
the CPU time of all the run's processes is watched. Two backends give the same per-run
limits: cgroup v1 (`executor.cgroups_v1`: root with the v1 hierarchies) and cgroup v2
(`executor.cgroups_v2`: the group the executor was started in, delegated to it). Without
either the executor falls back to rlimits alone; `executor.app.choose_cgroups` says why, `/health` and the
start-up log say which limits are in force (`Enforcement`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

#: How often, and how many times, removing a group is tried again while its killed processes leave.
REMOVE_RETRY_S = 0.01
REMOVE_TRIES = 50
CPU_PERIOD_US = 100_000
SYS_BLOCK = Path("/sys/block")

#: What each per-run limit is, as `/health` names it.
PER_RUN_LIMITS = {
    "memory": "one memory limit for all the run's processes together (socket buffers included)",
    "peak_memory": "exact peak memory and OOM-kill verdict of the whole run",
    "processes": "a process cap per run",
    "cpu_time": "CPU time of all the run's processes together",
    "one_cpu": "at most one CPU per run",
    "disk_reads": "disk reads capped per run",
}
#: What an operator changes to get cgroups, per host kind.
HOW_TO_GET_CGROUPS = (
    "cgroup v2: start the executor in a cgroup delegated to it with the memory and pids "
    "controllers (systemd: Delegate=yes; Docker: --cgroupns=private and a writable "
    "/sys/fs/cgroup; Kubernetes: see deploy/k8s/20-executor.yaml); cgroup v1: run it as root "
    "with the memory, pids, cpu and cpuacct hierarchies writable"
)


class CgroupsUnavailable(Exception):
    """Why per-run cgroups cannot be had here (the message says what to change)."""


@dataclass(frozen=True)
class DiskLimits:
    """Reads per second one run may make from each of the host's disks (0: no cap). Without
    them, one run reading with O_DIRECT (or thrashing in a tiny memory limit) kept the disk
    busy enough to make the host's own reads ~60 times slower."""

    read_bytes_per_s: int
    read_ops_per_s: int


@dataclass(frozen=True)
class RunStats:
    peak_memory_bytes: int
    oom_killed: bool
    pids_refused: int
    cpu_ns: int


@dataclass(frozen=True)
class Enforcement:
    """Which per-run limits are in force, and for those a cgroup v1 host would give but this
    one does not, why and what to change (`/health`, the start-up log)."""

    by: str
    missing: dict[str, str] = field(default_factory=dict)
    fix: str = ""

    @property
    def in_force(self) -> list[str]:
        return [name for name in PER_RUN_LIMITS if name not in self.missing]

    def to_dict(self) -> dict[str, object]:
        return {"by": self.by, "in_force": self.in_force, "missing": self.missing, "fix": self.fix}

    @classmethod
    def rlimits_only(cls, why: str, fix: str = HOW_TO_GET_CGROUPS) -> Enforcement:
        """Limits per process only: none of the per-run ones hold."""
        return cls("rlimit", dict.fromkeys(PER_RUN_LIMITS, why), fix)


class RunGroup(ABC):
    """One run's cgroups (one folder per v1 hierarchy, or one v2 group), fresh for each run so
    nothing charged by an earlier run (page cache, socket buffers still held by the kernel)
    counts against it. The run's first process joins them before it execs bwrap, so every
    process of the run is counted. The backends say how limits are set and usage is read."""

    def __init__(self, paths: dict[str, Path]) -> None:
        self.paths = paths

    @property
    def procs_files(self) -> list[str]:
        return [str(path / "cgroup.procs") for path in self.paths.values()]

    @abstractmethod
    def limit(self, memory_bytes: int, max_pids: int) -> None:
        """Cap the memory of all the run's processes together and their number. Raises
        OSError if the kernel refuses."""
        ...

    @abstractmethod
    def cpu_ns(self) -> int:
        """CPU time used by every process of the run so far (read every `CPU_POLL_S`)."""
        ...

    @abstractmethod
    def stats(self) -> RunStats:
        """What the run used: CPU, peak memory, whether it ran out of memory."""

    def kill(self) -> None:  # noqa: B027 (not abstract: a backend may have nothing more to do)
        """Kill every process of the run at once, where the backend can (v2's cgroup.kill);
        the run's own kill (its pid namespace's end) does it anyway."""

    def sweep(self) -> None:
        """Kill anything left in the group (nothing should be: the pid namespace died)."""
        for path in self.paths.values():
            with contextlib.suppress(OSError):
                for pid in (path / "cgroup.procs").read_text().split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), 9)

    def remove(self) -> None:
        """Remove the groups; what is still in them is killed first (a group with a process
        in it cannot go). An ended run's groups are empty: they go at the first try. Killed
        processes leave a group a moment later: it is tried again then, from the event loop
        when one runs (never blocking it), else here."""
        if not self._rmdir():
            return
        self.sweep()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            for _ in range(REMOVE_TRIES):
                time.sleep(REMOVE_RETRY_S)
                if not self._rmdir():
                    return
                self.sweep()
            return
        self._retry_later(loop, REMOVE_TRIES)

    def _retry_later(self, loop: asyncio.AbstractEventLoop, tries: int) -> None:
        def again() -> None:
            if self._rmdir() and tries > 1:
                self.sweep()
                self._retry_later(loop, tries - 1)

        loop.call_later(REMOVE_RETRY_S, again)

    def _rmdir(self) -> bool:
        """Remove what groups can go; whether any is left."""
        left = {}
        for controller, path in self.paths.items():
            try:
                path.rmdir()
            except FileNotFoundError:
                pass
            except OSError:
                left[controller] = path
        self.paths = left
        return bool(left)


class Cgroups(Protocol):
    """A cgroup backend: makes each run's groups and undoes its own at shutdown."""

    #: "cgroup-v1" or "cgroup-v2"
    kind: str
    #: the disk read caps the kernel accepted (none: reads are not capped)
    disk_rules: list[tuple[str, str]]

    def create(self, name: str, uid: int, memory_bytes: int, max_pids: int) -> RunGroup:
        """A fresh group for one run, its limits set. Raises OSError if the kernel refuses."""
        ...

    def enforcement(self) -> Enforcement: ...

    def close(self) -> None: ...


def whole_disks() -> list[str]:
    """Every disk of the host, as "major:minor". Whole disks only: the kernel refuses limits on
    partitions, and a disk's limit covers its partitions."""
    devices = []
    for disk in sorted(SYS_BLOCK.glob("*")):
        if disk.name.startswith(("loop", "ram")):
            continue  # nothing a run can reach lives on these
        with contextlib.suppress(OSError):
            devices.append((disk / "dev").read_text().strip())
    return devices


def accepted(probe: Path, rules: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The rules the kernel takes, tried once on a probe group made for it: a disk it refuses
    (a device that cannot be throttled) must not make every run's set-up fail."""
    probe.mkdir(exist_ok=True)
    try:
        taken = []
        for setting, rule in rules:
            with contextlib.suppress(OSError):
                (probe / setting).write_text(rule)
                taken.append((setting, rule))
        return taken
    finally:
        probe.rmdir()


def read_kv(path: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in path.read_text().splitlines():
        key, _, value = line.partition(" ")
        if value.strip().isdigit():
            out[key] = int(value)
    return out
