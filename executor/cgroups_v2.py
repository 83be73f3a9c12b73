"""The cgroup v2 backend: the group this executor was started in, delegated to it (systemd's
`Delegate=yes`; a container with its own cgroup namespace and /sys/fs/cgroup writable).

It never writes above that group. A v2 group that hands controllers to its children may hold
no process itself, so at start the processes in it (the executor, a container's init) move
into a leaf, `<group>/executor`; the controllers are enabled for `<group>/runs`, and each
executor's runs go in `<group>/runs/crucible-<pid>/`, a group each (several executors may share
a service's group: each clears only its own and those of executors that have gone). Only the
real root cgroup (a machine without systemd) is left as it is: runs then go under
`/crucible-<pid>/`.

A group is taken as delegated when systemd marked it so (the `trusted.delegate` or
`user.delegate` attribute `Delegate=yes` sets) or when it is the root of this process's own
cgroup namespace (a container's); anything else (a login session's scope, a service without
`Delegate=yes`) is left alone, since moving its processes would move the user's shell too.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

from executor.cgroups import (
    CPU_PERIOD_US,
    REMOVE_RETRY_S,
    CgroupsUnavailable,
    DiskLimits,
    Enforcement,
    RunGroup,
    RunStats,
    accepted,
    read_kv,
    whole_disks,
)

MOUNTINFO = Path("/proc/self/mountinfo")
PROC_CGROUP = Path("/proc/self/cgroup")
#: Where the v1 memory hierarchy is, on v1 and hybrid hosts (v2 then holds no controller).
V1_MEMORY = Path("/sys/fs/cgroup/memory/cgroup.procs")
REQUIRED = ("memory", "pids")
#: cpu: at most one CPU per run (cpu.max); io: disk reads capped (io.max). CPU time is read
#: from cpu.stat, which every v2 group has.
OPTIONAL = ("cpu", "io")
LEAF = "executor"
#: How long start and stop wait for the killed processes of leftover run groups to leave them.
REMOVE_WAIT_S = 5.0
RUNS = "runs"
FIX = (
    "give the executor a cgroup of its own, delegated with the memory and pids controllers "
    "(systemd: Delegate=yes; Docker: --cgroupns=private and /sys/fs/cgroup mounted read-write; "
    "see deploy/README.md)"
)


class NotV2(Exception):
    """This host does not run this process under cgroup v2 with controllers (v1 or hybrid)."""


class V2RunGroup(RunGroup):
    """A run's group on the unified hierarchy."""

    def __init__(self, path: Path) -> None:
        super().__init__({"unified": path})
        self.path = path
        #: largest memory.current seen, where the kernel has no memory.peak (before 5.19)
        self._polled_peak = 0

    def limit(self, memory_bytes: int, max_pids: int) -> None:
        """Socket buffers are charged to the group's memory by the kernel itself on v2."""
        (self.path / "memory.max").write_text(str(memory_bytes))
        swap = self.path / "memory.swap.max"
        if swap.exists():  # the kernel accounts swap: a run may not use it
            swap.write_text("0")
        (self.path / "pids.max").write_text(str(max_pids))

    def cpu_ns(self) -> int:
        """Read every `CPU_POLL_S` by the CPU-time watchdog; samples memory too where the
        kernel keeps no peak."""
        if not (self.path / "memory.peak").exists():
            with contextlib.suppress(OSError, ValueError):
                current = int((self.path / "memory.current").read_text())
                self._polled_peak = max(self._polled_peak, current)
        return read_kv(self.path / "cpu.stat")["usage_usec"] * 1000

    def stats(self) -> RunStats:
        path = self.path
        try:
            peak = int((path / "memory.peak").read_text())
        except FileNotFoundError:
            peak = max(self._polled_peak, int((path / "memory.current").read_text()))
        return RunStats(
            peak_memory_bytes=peak,
            oom_killed=read_kv(path / "memory.events").get("oom_kill", 0) > 0,
            pids_refused=read_kv(path / "pids.events").get("max", 0),
            cpu_ns=read_kv(path / "cpu.stat")["usage_usec"] * 1000,
        )

    def kill(self) -> None:
        """Every process of the run at once (cgroup.kill, Linux 5.14), forks in flight too."""
        try:
            (self.path / "cgroup.kill").write_text("1")
        except FileNotFoundError:
            super().sweep()
        except OSError:
            pass

    def sweep(self) -> None:
        self.kill()


class CgroupsV2:
    """Run groups in `runs` beside the executor's leaf, in the group delegated to it."""

    kind = "cgroup-v2"

    def __init__(self, base: Path, runs: Path, controllers: set[str], disk_rules: list[tuple[str, str]]):
        self.base = base
        self.runs = runs
        self.controllers = controllers
        self.disk_rules = disk_rules

    @classmethod
    def open(cls, disk_limits: DiskLimits) -> CgroupsV2:
        """This process's delegated group, set up for runs. Raises `NotV2` on a host whose
        cgroups are v1 (try those), `CgroupsUnavailable` (saying why) where v2 is the host's
        but the group cannot be used."""
        base = own_group()
        if base is None:
            raise NotV2("no cgroup2 mount holds this process")
        offered = set(_read_words(base / "cgroup.controllers"))
        if "memory" not in offered and V1_MEMORY.exists():
            raise NotV2("a hybrid host: the controllers are on the v1 hierarchies")
        if missing := [c for c in REQUIRED if c not in offered]:
            raise CgroupsUnavailable(
                f"cgroup v2: the controllers {', '.join(missing)} are not delegated to this executor's "
                f"group {base} (it has: {', '.join(sorted(offered)) or 'none'}); {FIX}"
            )
        if not os.access(base / "cgroup.procs", os.W_OK) or not os.access(base, os.W_OK):
            raise CgroupsUnavailable(f"cgroup v2: this executor's group {base} is not writable; {FIX}")
        if (base / "cgroup.type").exists() and not _delegated(base):
            raise CgroupsUnavailable(f"cgroup v2: this executor's group {base} is not delegated to it; {FIX}")
        try:
            runs = _set_up(base)
            enabled = set()
            for controller in (*REQUIRED, *OPTIONAL):
                chain = [base, *([runs.parent] if runs.parent != base else []), runs]
                if controller in offered and all(_enable(group, controller) for group in chain):
                    enabled.add(controller)
        except OSError as exc:
            raise CgroupsUnavailable(f"cgroup v2: could not set up {base}: {exc}; {FIX}") from exc
        if missing := [c for c in REQUIRED if c not in enabled]:
            raise CgroupsUnavailable(
                f"cgroup v2: could not enable {', '.join(missing)} for the runs' groups in {base} "
                f"(a process left in it, or a threaded group); {FIX}"
            )
        rules = _disk_rules(disk_limits) if "io" in enabled else []
        return cls(base, runs, enabled, accepted(runs / "probe", rules) if rules else [])

    def enforcement(self) -> Enforcement:
        missing = {}
        fixes = []
        if "cpu" not in self.controllers:
            missing["one_cpu"] = f"the cpu controller is not delegated to {self.base}"
            fixes.append("delegate the cpu controller")
        if not self.disk_rules:
            missing["disk_reads"] = (
                f"the io controller is not delegated to {self.base}" if "io" not in self.controllers
                else "no disk of the host takes io.max limits"
            )  # fmt: skip
            if "io" not in self.controllers:
                fixes.append("delegate the io controller")
        fix = f"{' and '.join(fixes)} (systemd's Delegate=yes delegates both)" if fixes else ""
        return Enforcement(self.kind, missing, fix)

    def create(self, name: str, uid: int, memory_bytes: int, max_pids: int) -> RunGroup:
        """A fresh group for one run: memory and processes capped, one CPU where the cpu
        controller is delegated, disk reads capped where io is. Raises OSError if the kernel
        refuses; the caller treats that as the sandbox's failure. The run's launcher joins it
        before it drops to the slot's uid (a v2 move needs write access where the two groups
        meet, which the slot's uid has not)."""
        path = self.runs / name
        path.mkdir()
        group = V2RunGroup(path)
        try:
            group.limit(memory_bytes, max_pids)
            if "cpu" in self.controllers:  # at most one core, however many processes
                (path / "cpu.max").write_text(f"{CPU_PERIOD_US} {CPU_PERIOD_US}")
            for setting, rule in self.disk_rules:
                (path / setting).write_text(rule)
        except OSError:
            group.remove()
            raise
        return group

    def close(self) -> None:
        """Every run group goes (killed first, waited for); the executor's own leaf stays (it
        is in it)."""
        _remove_groups(self.runs)
        with contextlib.suppress(OSError):
            self.runs.rmdir()
            if self.runs.parent != self.base:  # the shared `runs`, if no other executor uses it
                self.runs.parent.rmdir()


def own_group() -> Path | None:
    """This process's cgroup on the cgroup2 mount, or None where it has none."""
    lines = PROC_CGROUP.read_text().splitlines()
    relative = next((line[3:] for line in lines if line.startswith("0::")), None)
    if relative is None or relative.startswith("/.."):  # outside our cgroup namespace
        return None
    for line in MOUNTINFO.read_text().splitlines():
        fields, _, after = line.partition(" - ")
        if not after.startswith("cgroup2 "):
            continue
        mount_root, mount_point = fields.split()[3:5]
        mount_root = mount_root.rstrip("/")
        if relative == mount_root or relative.startswith(mount_root + "/"):
            path = Path(_unescape(mount_point)) / relative[len(mount_root) :].lstrip("/")
            if (path / "cgroup.procs").exists():
                return path
    return None


def _set_up(base: Path) -> Path:
    """The folder the runs' groups go in, made fresh; the processes of a delegated group moved
    to its leaf first. Groups left by an earlier executor there are killed and removed."""
    if not (base / "cgroup.type").exists():  # the real root: its processes may stay
        runs = base / f"crucible-{os.getpid()}"
        for stale in base.glob("crucible-*"):
            pid = stale.name.removeprefix("crucible-")
            if pid.isdigit() and not Path(f"/proc/{pid}").exists():
                _remove_groups(stale)
                with contextlib.suppress(OSError):
                    stale.rmdir()
    else:
        leaf = base / LEAF
        leaf.mkdir(exist_ok=True)
        for _ in range(3):  # again for any process forked meanwhile
            for pid in _read_words(base / "cgroup.procs"):
                with contextlib.suppress(OSError):  # one that ended meanwhile (else: said below)
                    (leaf / "cgroup.procs").write_text(pid)
        shared = base / RUNS
        shared.mkdir(exist_ok=True)
        runs = shared / f"crucible-{os.getpid()}"
        for stale in shared.glob("crucible-*"):  # executors that have gone, and their runs
            pid = stale.name.removeprefix("crucible-")
            if stale != runs and pid.isdigit() and not Path(f"/proc/{pid}").exists():
                _remove_groups(stale)
                with contextlib.suppress(OSError):
                    stale.rmdir()
    runs.mkdir(exist_ok=True)
    _remove_groups(runs)
    return runs


def _delegated(group: Path) -> bool:
    """Whether `group` is ours to manage: marked delegated by systemd (251 and later), the
    root of this process's cgroup namespace (a container's own), or a group other than a
    scope (a login session's, a terminal's) that holds only this process and its ancestors
    (a service's: systemd before 251 marks no delegation)."""
    for name in ("trusted.delegate", "user.delegate"):
        with contextlib.suppress(OSError):
            if os.getxattr(group, name).strip(b"\0") in (b"1", b"yes", b"true"):
                return True
    if any(line == "0::/" for line in PROC_CGROUP.read_text().splitlines()):
        return True
    return not group.name.endswith(".scope") and set(_read_words(group / "cgroup.procs")) <= _lineage()


def _lineage() -> set[str]:
    """This process and its ancestors, by pid."""
    pids, pid = set(), os.getpid()
    while pid > 0:
        pids.add(str(pid))
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        pid = int(stat.rpartition(")")[2].split()[1])  # the parent's pid, after the command name
    return pids


def _enable(group: Path, controller: str) -> bool:
    """Give `group`'s children `controller`; whether they have it."""
    if controller in _read_words(group / "cgroup.subtree_control"):
        return True
    with contextlib.suppress(OSError):
        (group / "cgroup.subtree_control").write_text(f"+{controller}")
    return controller in _read_words(group / "cgroup.subtree_control")


def _remove_groups(folder: Path) -> None:
    """Kill and remove every group in `folder`, waiting (up to `REMOVE_WAIT_S`) for their
    killed processes to leave them. Only at start and stop, so it blocks: at stop the event
    loop is ending, and a removal left to it to try again later never happened (found in the
    VM test: a fork server's prepared run group, and with it `runs`, outlived the executor)."""
    deadline = time.monotonic() + REMOVE_WAIT_S
    groups = [V2RunGroup(child) for child in folder.iterdir() if child.is_dir()]
    for group in groups:
        group.kill()
    for group in groups:
        while group._rmdir() and time.monotonic() < deadline:
            time.sleep(REMOVE_RETRY_S)


def _disk_rules(limits: DiskLimits) -> list[tuple[str, str]]:
    """("io.max", "major:minor rbps=N riops=N") for every disk of the host."""
    caps = [f"{key}={value}" for key, value in (("rbps", limits.read_bytes_per_s),
                                                 ("riops", limits.read_ops_per_s)) if value > 0]  # fmt: skip
    return [("io.max", f"{device} {' '.join(caps)}") for device in whole_disks()] if caps else []


def _read_words(path: Path) -> list[str]:
    return path.read_text().split()


def _unescape(field: str) -> str:
    """A mountinfo path, its spaces and such octal-escaped by the kernel."""
    return field.encode().decode("unicode_escape")
