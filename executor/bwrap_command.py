"""The command line that isolates one program: bwrap's namespaces and mounts, then prlimit's
rlimits, then the program. Only builds the argv; starting it is `executor.spawn`'s job."""

from __future__ import annotations

from pathlib import Path

from executor.limits import Limits

#: Size of the run's /dev/shm (POSIX shared memory, semaphores); /tmp and this are the only
#: writable places in the sandbox, both size-capped tmpfs.
SHM_BYTES = 16 * 1024 * 1024


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
