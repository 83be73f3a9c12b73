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
) -> list[str]:
    """The full argv: bwrap's isolation, then prlimit, then the program.

    `files` are (fd, path in the sandbox, permissions) handed in read-only; bwrap reports
    on `status_fd` how the program ended only if it started, which tells its failures from
    the program's.
    """
    binds: list[str] = []
    for fd, path, perms in files:
        binds += ["--perms", perms, "--ro-bind-data", str(fd), path]
    seconds = max(1, int(cpu + 0.999))
    return [
        str(bwrap),
        "--unshare-all",
        "--unshare-user",
        "--disable-userns",
        "--cap-drop", "ALL",
        "--die-with-parent",
        "--new-session",
        "--hostname", "sandbox",
        "--ro-bind", "/usr", "/usr",
        "--tmpfs", "/usr/local",  # site-installed tools and their config (tokens) stay hidden
        "--symlink", "usr/lib", "/lib",
        "--symlink", "usr/lib64", "/lib64",
        "--symlink", "usr/bin", "/bin",
        "--proc", "/proc",
        *proc_masks(),
        "--dev", "/dev",
        "--ro-bind", "/dev/null", "/dev/pts/ptmx",  # no pseudo-terminals: a host-wide pool
        "--size", str(SHM_BYTES),
        "--tmpfs", "/dev/shm",
        "--size", str(limits.tmpfs_mb * 1024 * 1024),
        "--tmpfs", "/tmp",
        "--dir", "/sandbox",
        *binds,
        "--remount-ro", "/",
        "--remount-ro", "/dev",
        "--remount-ro", "/usr/local",
        "--chdir", "/tmp",
        "--clearenv",
        "--setenv", "PATH", "/usr/bin:/bin",
        "--setenv", "HOME", "/tmp",
        "--setenv", "TMPDIR", "/tmp",
        "--setenv", "LANG", "C.UTF-8",
        "--json-status-fd", str(status_fd),
        *(["--seccomp", str(seccomp_fd)] if seccomp_fd is not None else []),
        "/usr/bin/prlimit",
        f"--cpu={seconds}:{seconds + 1}",
        f"--as={memory_mb * 1024 * 1024}",
        f"--nproc={limits.processes}",
        f"--fsize={limits.file_size_mb * 1024 * 1024}",
        f"--nofile={limits.open_files}",
        "--core=0",
        "--",
        *argv,
    ]  # fmt: skip
