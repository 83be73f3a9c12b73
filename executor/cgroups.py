"""Per-run memory and process accounting with cgroups, where the machine lets us.

cgroup v2 with delegation is preferred; this machine kind offers the v1 `memory` and `pids`
hierarchies to root, so v1 is what is implemented. Each run gets its own group: the memory
limit holds for all its processes together (RLIMIT_AS is per process), peak memory and OOM
kills are read back exactly, and `pids.max` caps processes. Without a writable hierarchy the
executor falls back to rlimits alone, and `/health` says which is in force.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

V1_ROOT = Path("/sys/fs/cgroup")
CONTROLLERS = ("memory", "pids", "cpuacct", "cpu")
#: Used where the machine has it: caps each run's reads from the host's disks.
DISK_CONTROLLER = "blkio"
SYS_BLOCK = Path("/sys/block")
#: Socket buffer memory a run may hold, within its memory limit.
TCP_BUFFER_BYTES = 64 * 1024 * 1024
CPU_PERIOD_US = 100_000
#: How often, and how many times, removing a group is tried again while its killed processes leave.
REMOVE_RETRY_S = 0.01
REMOVE_TRIES = 50


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


class RunGroup:
    """One run's cgroups, fresh for each run so nothing charged by an earlier run (page cache,
    socket buffers still held by the kernel) counts against it. The run's first process joins
    them before it execs bwrap, so every process of the run is counted."""

    def __init__(self, paths: dict[str, Path]) -> None:
        self.paths = paths

    @property
    def procs_files(self) -> list[str]:
        return [str(path / "cgroup.procs") for path in self.paths.values()]

    def limit(self, memory_bytes: int, max_pids: int) -> None:
        """Cap the memory of all the run's processes together (socket buffers included) and
        their number. Raises OSError if the kernel refuses (below what is in use, say)."""
        memory = self.paths["memory"]
        # memory+swap may never be below memory alone: raised first when raising, after when
        # lowering (either write fails harmlessly where the kernel does not account swap)
        with contextlib.suppress(OSError):
            (memory / "memory.memsw.limit_in_bytes").write_text(str(memory_bytes))
        (memory / "memory.limit_in_bytes").write_text(str(memory_bytes))
        with contextlib.suppress(OSError):
            (memory / "memory.memsw.limit_in_bytes").write_text(str(memory_bytes))
        # TCP buffers on the run's own loopback come from a host-wide pool: charge them too
        (memory / "memory.kmem.tcp.limit_in_bytes").write_text(str(min(memory_bytes, TCP_BUFFER_BYTES)))
        (self.paths["pids"] / "pids.max").write_text(str(max_pids))

    def cpu_ns(self) -> int:
        """CPU time used by every process of the run so far."""
        return int((self.paths["cpuacct"] / "cpuacct.usage").read_text())

    def stats(self) -> RunStats:
        memory, pids = self.paths["memory"], self.paths["pids"]
        return RunStats(
            peak_memory_bytes=int((memory / "memory.max_usage_in_bytes").read_text()),
            oom_killed=_read_kv(memory / "memory.oom_control").get("oom_kill", 0) > 0,
            pids_refused=_read_kv(pids / "pids.events").get("max", 0),
            cpu_ns=int((self.paths["cpuacct"] / "cpuacct.usage").read_text()),
        )

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


class CgroupsV1:
    """Run groups under `<hierarchy>/crucible-<executor pid>/`."""

    def __init__(self, disk_limits: DiskLimits, root: Path = V1_ROOT) -> None:
        controllers = [*CONTROLLERS]
        self.disk_rules: list[tuple[str, str]] = []
        if (root / DISK_CONTROLLER / "cgroup.procs").exists():
            controllers.append(DISK_CONTROLLER)
            self.disk_rules = _disk_rules(disk_limits)
        self.base = {c: root / c / f"crucible-{os.getpid()}" for c in controllers}

    @classmethod
    def open(cls, disk_limits: DiskLimits) -> CgroupsV1 | None:
        """The v1 hierarchies if this process may manage them, else None (use rlimits)."""
        if os.geteuid() != 0 or not all((V1_ROOT / c / "cgroup.procs").exists() for c in CONTROLLERS):
            return None
        groups = cls(disk_limits)
        try:
            for path in groups.base.values():
                _remove_stale_siblings(path)
                path.mkdir(exist_ok=True)
        except OSError:
            return None
        if groups.disk_rules:
            groups.disk_rules = _accepted(groups.base[DISK_CONTROLLER], groups.disk_rules)
        return groups

    def create(self, name: str, uid: int, memory_bytes: int, max_pids: int) -> RunGroup:
        """A fresh group for one run: memory (with socket buffers) and processes capped, one CPU,
        disk reads capped where the machine has the blkio hierarchy.

        Raises OSError if the kernel refuses; the caller treats that as the sandbox's failure.
        """
        paths = {c: base / name for c, base in self.base.items()}
        group = RunGroup(paths)
        try:
            for path in paths.values():
                path.mkdir()
            group.limit(memory_bytes, max_pids)
            # at most one core each, however many sessions or processes the run makes
            (paths["cpu"] / "cpu.cfs_period_us").write_text(str(CPU_PERIOD_US))
            (paths["cpu"] / "cpu.cfs_quota_us").write_text(str(CPU_PERIOD_US))
            for setting, rule in self.disk_rules:
                (paths[DISK_CONTROLLER] / setting).write_text(rule)
            for path in paths.values():  # the run's own uid moves itself in
                os.chown(path / "cgroup.procs", uid, -1)
        except OSError:
            group.remove()
            raise
        return group

    def close(self) -> None:
        for path in self.base.values():
            _remove_stale_siblings(path, only_dead=False)


def _disk_rules(limits: DiskLimits) -> list[tuple[str, str]]:
    """(file, "major:minor limit") for every disk of the host. Whole disks only: the kernel
    refuses limits on partitions, and a disk's limit covers its partitions."""
    settings = [("blkio.throttle.read_bps_device", limits.read_bytes_per_s),
                ("blkio.throttle.read_iops_device", limits.read_ops_per_s)]  # fmt: skip
    rules = []
    for disk in sorted(SYS_BLOCK.glob("*")):
        if disk.name.startswith(("loop", "ram")):
            continue  # nothing a run can reach lives on these
        with contextlib.suppress(OSError):
            device = (disk / "dev").read_text().strip()
            rules += [(setting, f"{device} {value}") for setting, value in settings if value > 0]
    return rules


def _accepted(base: Path, rules: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The rules the kernel takes, tried once on a probe group: a disk it refuses (a device
    that cannot be throttled) must not make every run's set-up fail."""
    probe = base / "probe"
    probe.mkdir(exist_ok=True)
    try:
        accepted = []
        for setting, rule in rules:
            with contextlib.suppress(OSError):
                (probe / setting).write_text(rule)
                accepted.append((setting, rule))
        return accepted
    finally:
        probe.rmdir()


def _remove_stale_siblings(base: Path, only_dead: bool = True) -> None:
    """Delete groups left by executors that died without cleaning up (their pid is gone), or,
    at shutdown, this executor's own."""
    for stale in base.parent.glob("crucible-*"):
        pid = stale.name.removeprefix("crucible-")
        if (not only_dead and stale == base) or (pid.isdigit() and not Path(f"/proc/{pid}").exists()):
            for group in [*stale.iterdir()]:
                if group.is_dir():
                    with contextlib.suppress(OSError):
                        group.rmdir()
            with contextlib.suppress(OSError):
                stale.rmdir()


def _read_kv(path: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in path.read_text().splitlines():
        key, _, value = line.partition(" ")
        if value.strip().isdigit():
            out[key] = int(value)
    return out
