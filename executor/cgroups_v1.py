"""The cgroup v1 backend: root with the v1 `memory`, `pids`, `cpu` and `cpuacct` hierarchies
(and `blkio` where present). Run groups live under `<hierarchy>/crucible-<executor pid>/`."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from executor.cgroups import (
    CPU_PERIOD_US,
    CgroupsUnavailable,
    DiskLimits,
    Enforcement,
    RunGroup,
    RunStats,
    accepted,
    read_kv,
    whole_disks,
)

V1_ROOT = Path("/sys/fs/cgroup")
CONTROLLERS = ("memory", "pids", "cpuacct", "cpu")
#: Used where the machine has it: caps each run's reads from the host's disks.
DISK_CONTROLLER = "blkio"
#: Socket buffer memory a run may hold, within its memory limit.
TCP_BUFFER_BYTES = 64 * 1024 * 1024


class V1RunGroup(RunGroup):
    """A run's folder in each v1 hierarchy."""

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
        return int((self.paths["cpuacct"] / "cpuacct.usage").read_text())

    def stats(self) -> RunStats:
        memory, pids = self.paths["memory"], self.paths["pids"]
        return RunStats(
            peak_memory_bytes=int((memory / "memory.max_usage_in_bytes").read_text()),
            oom_killed=read_kv(memory / "memory.oom_control").get("oom_kill", 0) > 0,
            pids_refused=read_kv(pids / "pids.events").get("max", 0),
            cpu_ns=int((self.paths["cpuacct"] / "cpuacct.usage").read_text()),
        )


class CgroupsV1:
    """Run groups under `<hierarchy>/crucible-<executor pid>/`."""

    kind = "cgroup-v1"

    def __init__(self, disk_limits: DiskLimits, root: Path = V1_ROOT) -> None:
        controllers = [*CONTROLLERS]
        self.disk_rules: list[tuple[str, str]] = []
        if (root / DISK_CONTROLLER / "cgroup.procs").exists():
            controllers.append(DISK_CONTROLLER)
            self.disk_rules = _disk_rules(disk_limits)
        self.base = {c: root / c / f"crucible-{os.getpid()}" for c in controllers}

    @classmethod
    def open(cls, disk_limits: DiskLimits) -> CgroupsV1:
        """The v1 hierarchies if this process may manage them; else `CgroupsUnavailable`."""
        if os.geteuid() != 0:
            raise CgroupsUnavailable("cgroup v1 needs the executor to run as root")
        if not all((V1_ROOT / c / "cgroup.procs").exists() for c in CONTROLLERS):
            raise CgroupsUnavailable(
                f"no cgroup v2 group of this process and no cgroup v1 hierarchies {', '.join(CONTROLLERS)} "
                f"under {V1_ROOT}"
            )
        groups = cls(disk_limits)
        try:
            for path in groups.base.values():
                _remove_stale_siblings(path)
                path.mkdir(exist_ok=True)
        except OSError as exc:
            raise CgroupsUnavailable(f"the cgroup v1 hierarchies are not writable: {exc}") from exc
        if groups.disk_rules:
            groups.disk_rules = accepted(groups.base[DISK_CONTROLLER] / "probe", groups.disk_rules)
        return groups

    def enforcement(self) -> Enforcement:
        if self.disk_rules:
            return Enforcement(self.kind)
        why = "no blkio hierarchy, or no disk the kernel throttles"
        return Enforcement(self.kind, {"disk_reads": why}, "mount the v1 blkio hierarchy")

    def create(self, name: str, uid: int, memory_bytes: int, max_pids: int) -> RunGroup:
        """A fresh group for one run: memory (with socket buffers) and processes capped, one CPU,
        disk reads capped where the machine has the blkio hierarchy.

        Raises OSError if the kernel refuses; the caller treats that as the sandbox's failure.
        """
        paths = {c: base / name for c, base in self.base.items()}
        group = V1RunGroup(paths)
        try:
            for path in paths.values():
                path.mkdir()
            group.limit(memory_bytes, max_pids)
            # at most one core each, however many sessions or processes the run makes
            (paths["cpu"] / "cpu.cfs_period_us").write_text(str(CPU_PERIOD_US))
            (paths["cpu"] / "cpu.cfs_quota_us").write_text(str(CPU_PERIOD_US))
            for setting, rule in self.disk_rules:
                (paths[DISK_CONTROLLER] / setting).write_text(rule)
            for path in paths.values():  # the run's own uid may move itself in (without setpriv)
                os.chown(path / "cgroup.procs", uid, -1)
        except OSError:
            group.remove()
            raise
        return group

    def close(self) -> None:
        for path in self.base.values():
            _remove_stale_siblings(path, only_dead=False)


def _disk_rules(limits: DiskLimits) -> list[tuple[str, str]]:
    """(file, "major:minor limit") for every disk of the host."""
    settings = [("blkio.throttle.read_bps_device", limits.read_bytes_per_s),
                ("blkio.throttle.read_iops_device", limits.read_ops_per_s)]  # fmt: skip
    return [(setting, f"{device} {value}") for device in whole_disks() for setting, value in settings
            if value > 0]  # fmt: skip


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
