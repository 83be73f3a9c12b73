"""The command line that isolates one program: bwrap's namespaces and mounts, then prlimit's
rlimits, then the program. Only builds the argv; starting it is `executor.spawn`'s job."""

from __future__ import annotations

from functools import cache
from pathlib import Path

from executor.limits import Limits

#: Size of the run's /dev/shm (POSIX shared memory, semaphores); /tmp and this are the only
#: writable places in the sandbox, both size-capped tmpfs.
SHM_BYTES = 16 * 1024 * 1024
#: Host-wide facts in /proc a run has no use for, hidden as container runtimes hide them: the
#: host's boot arguments and kernel build, kernel symbol names, how busy the machine's AIO and
#: pressure are (other tenants' activity), and pid 1's command line (bwrap's own, naming the
#: executor's staging folder). Files get /dev/null bound over them, folders an empty tmpfs.
MASKED_PROC_FILES = ("/proc/cmdline", "/proc/config.gz", "/proc/kallsyms", "/proc/sys/fs/aio-nr",
                     "/proc/1/cmdline")  # fmt: skip
MASKED_PROC_DIRS = ("/proc/pressure",)
MB = 1024 * 1024
#: The fork server's own /tmp: it writes nothing there (each run mounts its own).
FORK_SERVER_TMPFS_MB = 1
#: prlimit's option for each rlimit.
PRLIMIT_NAMES = {"RLIMIT_CPU": "cpu", "RLIMIT_AS": "as", "RLIMIT_NPROC": "nproc",
                 "RLIMIT_FSIZE": "fsize", "RLIMIT_NOFILE": "nofile", "RLIMIT_CORE": "core"}  # fmt: skip


@cache
def proc_masks() -> tuple[str, ...]:
    """bwrap's arguments hiding what of `MASKED_PROC_*` this kernel has (binding over a path
    the sandbox's /proc lacks would fail every run)."""
    masks: list[str] = []
    for path in MASKED_PROC_FILES:
        if path == "/proc/1/cmdline" or Path(path).exists():
            masks += ["--ro-bind", "/dev/null", path]
    for path in MASKED_PROC_DIRS:
        if Path(path).is_dir():
            masks += ["--tmpfs", path, "--remount-ro", path]
    return tuple(masks)


def bwrap_command(
    bwrap: Path,
    argv: tuple[str, ...],
    files: list[tuple[int, str, str]],
    status_fd: int,
    memory_mb: int,
    limits: Limits,
    cpu: float,
    seccomp_fd: int | None = None,
    host_dirs: tuple[str, ...] = (),
) -> list[str]:
    """The full argv: bwrap's isolation, then prlimit, then the program.

    `files` are (fd, path in the sandbox, permissions) handed in read-only; bwrap reports
    on `status_fd` how the program ended only if it started, which tells its failures from
    the program's. `host_dirs` are host folders beside /usr the language's toolchain reads
    (`Language.host_dirs`), bound read-only at the same place.
    """
    return [
        *isolation(bwrap, files, limits.tmpfs_mb, workdir=limits.workdir, host_dirs=host_dirs),
        "--cap-drop", "ALL",
        "--json-status-fd", str(status_fd),
        *(["--seccomp", str(seccomp_fd)] if seccomp_fd is not None else []),
        "/usr/bin/prlimit",
        *prlimit_options(rlimits(limits, memory_mb, cpu)),
        "--",
        *argv,
    ]  # fmt: skip


def fork_server_command(bwrap: Path, argv: tuple[str, ...], files: list[tuple[int, str, str]]) -> list[str]:
    """A slot's fork server (`executor.fork_server`): a cold run's isolation, but with its
    capabilities inside its own user namespace, which it needs to give each run namespaces
    of its own, and no seccomp filter or rlimits (each run applies its own).

    Its /proc has no masks and its user namespace is bwrap's first (no `--disable-userns`,
    which would nest one more): a run mounts a /proc of its own, which the kernel allows only
    where the existing one has nothing mounted over it by a more privileged namespace. The
    server forbids new user namespaces itself (see the program), and each run masks its
    own /proc. No init of bwrap's: the server makes a pid namespace of its own (see the
    program), and the process it leaves behind is the first one's init.
    """
    return [
        *isolation(bwrap, files, FORK_SERVER_TMPFS_MB, for_runs=False),
        "--cap-add",
        "ALL",
        "--as-pid-1",
        *argv,
    ]


def rlimits(limits: Limits, memory_mb: int, cpu: float) -> dict[str, tuple[int, int]]:
    """A run's rlimits, (soft, hard) by name: CPU seconds, address space, processes, file size,
    open files, no core dumps."""
    seconds = max(1, int(cpu + 0.999))
    return {
        "RLIMIT_CPU": (seconds, seconds + 1),
        "RLIMIT_AS": (memory_mb * MB,) * 2,
        "RLIMIT_NPROC": (limits.processes,) * 2,
        "RLIMIT_FSIZE": (limits.file_size_mb * MB,) * 2,
        "RLIMIT_NOFILE": (limits.open_files,) * 2,
        "RLIMIT_CORE": (0, 0),
    }


def prlimit_options(limits: dict[str, tuple[int, int]]) -> list[str]:
    return [f"--{PRLIMIT_NAMES[name]}={soft}:{hard}" for name, (soft, hard) in limits.items()]


def isolation(
    bwrap: Path,
    files: list[tuple[int, str, str]],
    tmpfs_mb: int,
    for_runs: bool = True,
    workdir: str = "/tmp",
    host_dirs: tuple[str, ...] = (),
) -> list[str]:
    """bwrap's namespaces, root, environment and inputs: what every sandbox shares (`for_runs`:
    with no new user namespaces and /proc masked and read-only, which a fork server does for
    each run)."""
    binds: list[str] = []
    for folder in host_dirs:
        binds += ["--ro-bind", folder, folder]
    for fd, path, perms in files:
        binds += ["--perms", perms, "--ro-bind-data", str(fd), path]
    return [
        str(bwrap),
        "--unshare-all",
        "--unshare-user",
        *(["--disable-userns"] if for_runs else []),
        "--die-with-parent",
        "--new-session",
        "--hostname", "sandbox",
        "--ro-bind", "/usr", "/usr",
        "--tmpfs", "/usr/local",  # site-installed tools and their config (tokens) stay hidden
        "--symlink", "usr/lib", "/lib",
        "--symlink", "usr/lib64", "/lib64",
        "--symlink", "usr/bin", "/bin",
        "--proc", "/proc",
        *(proc_masks() if for_runs else ()),
        "--dev", "/dev",
        "--ro-bind", "/dev/null", "/dev/pts/ptmx",  # no pseudo-terminals: a host-wide pool
        "--size", str(SHM_BYTES),
        "--tmpfs", "/dev/shm",
        "--size", str(tmpfs_mb * MB),
        "--tmpfs", "/tmp",
        "--dir", "/sandbox",
        *binds,
        "--remount-ro", "/",
        "--remount-ro", "/dev",
        "--remount-ro", "/usr/local",
        # a run has nothing to write in /proc: read-only, /proc/sys included (bwrap covers
        # /proc/sys itself only where the run's uid could write it)
        *(["--remount-ro", "/proc"] if for_runs else []),
        "--chdir", workdir,
        "--clearenv",
        "--setenv", "PATH", "/usr/bin:/bin",
        "--setenv", "HOME", "/tmp",
        "--setenv", "TMPDIR", "/tmp",
        "--setenv", "LANG", "C.UTF-8",
    ]  # fmt: skip
