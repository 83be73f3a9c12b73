"""Starting one sandboxed process: fresh cgroups, inputs as memfds, the slot's uid, then bwrap.

Source, stdin and compiled binaries go in through memfds (`--ro-bind-data`, stdin): the
executor never creates, reads or deletes a file on the host on a run's behalf, so nothing a
run plants (symlinks, hard links) can be followed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from evaluations.languages import Language
from executor.cgroups import Cgroups, RunGroup
from executor.errors import SandboxError
from executor.limits import Limits

#: The whole environment the sandbox launcher (sh, bwrap) gets.
LAUNCH_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
#: util-linux's setpriv: how the launcher drops from root to a slot's uid (and no groups)
SETPRIV = Path("/usr/bin/setpriv")

#: Builds the sandbox's argv from (argv, files as (fd, path, perms), status fd, address space
#: in MB, limits, CPU seconds, seccomp fd, host folders bound read-only): `Sandbox.command`.
CommandBuilder = Callable[
    [tuple[str, ...], list[tuple[int, str, str]], int, int, Limits, float, int | None, tuple[str, ...]],
    list[str],
]


@dataclass
class Started:
    """A spawned bwrap sandbox and what must be read and undone when it ends (a `Program`)."""

    process: subprocess.Popen[bytes]
    group: RunGroup | None
    status_read: int

    @property
    def stdout(self) -> IO[bytes]:
        assert self.process.stdout is not None
        return self.process.stdout

    @property
    def stderr(self) -> IO[bytes]:
        assert self.process.stderr is not None
        return self.process.stderr

    @property
    def pid(self) -> int:
        return self.process.pid

    def kill(self) -> None:
        # bwrap's --die-with-parent takes the whole pid namespace down with it.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)

    async def wait(self) -> tuple[int, resource.struct_rusage]:
        """Reap bwrap without blocking the loop (pidfd), keeping the resource usage of it and
        every descendant it reaped, which asyncio's own subprocess support throws away."""
        loop = asyncio.get_running_loop()
        pidfd = os.pidfd_open(self.process.pid)
        done: asyncio.Future[tuple[int, resource.struct_rusage]] = loop.create_future()

        def ready() -> None:
            pid, status, usage = os.wait4(self.process.pid, os.WNOHANG)
            if pid and not done.done():
                self.process.returncode = os.waitstatus_to_exitcode(status)
                done.set_result((status, usage))

        loop.add_reader(pidfd, ready)
        try:
            return await done
        finally:
            loop.remove_reader(pidfd)
            os.close(pidfd)

    def finish(self) -> bool:
        """bwrap writes "exit-code" on its status pipe only once its own set-up (mounts
        included, which come after the clone that writes "child-pid") ended in a successful
        exec. It has ended: reading does not block."""
        chunks = []
        with contextlib.suppress(OSError):
            os.set_blocking(self.status_read, False)
            while chunk := os.read(self.status_read, 65536):
                chunks.append(chunk)
        os.close(self.status_read)
        return b'"exit-code"' in b"".join(chunks)


class Spawner:
    """Starts sandboxed processes; one per executor, shared by cold runs and fork servers."""

    def __init__(
        self,
        command: CommandBuilder,
        cgroups: Cgroups | None,
        seccomp: bytes | None,
        as_root: bool,
    ) -> None:
        self._command = command
        self._cgroups = cgroups
        self._seccomp = seccomp
        self._as_root = as_root

    def start(
        self,
        uid: int,
        argv: tuple[str, ...],
        files: list[tuple[bytes, str, str]],
        stdin: str | None,
        limits: Limits,
        memory_mb: int,
        timeout: float,
        language: Language | None,
        keep_fds: tuple[int, ...] = (),
    ) -> Started:
        """Spawn one sandboxed process in fresh cgroups; `keep_fds` are handed to it too."""
        address_space = self.address_space_mb(memory_mb, language)
        group = self.group(uid, memory_mb, limits)
        status_read, status_write = os.pipe()
        try:
            process = self._spawn(argv, files, stdin, status_write, group, uid, address_space, limits,
                                  timeout, keep_fds, language.host_dirs if language else ())  # fmt: skip
        except BaseException:
            os.close(status_read)
            if group:
                group.remove()
            raise
        return Started(process, group, status_read)

    def address_space_mb(self, memory_mb: int, language: Language | None) -> int:
        """A run's RLIMIT_AS. With cgroups the group holds memory; the rlimit then only stops
        absurd reservations (a refused one still reads as out of memory: see
        executor.verdict.OUT_OF_MEMORY_SIGNS). A runtime that reserves address space it does not
        use gets at least its floor (V8), or that much on top of its memory limit (a JVM)."""
        floor = language.min_address_space_mb if language else 0
        reserved = language.reserved_address_space_mb if language else 0
        return max(memory_mb * (4 if self._cgroups else 1), floor, memory_mb + reserved)

    def launch(
        self,
        uid: int,
        argv: tuple[str, ...],
        files: list[tuple[bytes, str, str]],
        command: Callable[[tuple[str, ...], list[tuple[int, str, str]]], list[str]],
        keep_fd: int,
    ) -> subprocess.Popen[bytes]:
        """Start a long-lived sandbox (a fork server) as `uid`, in no run's cgroups, with
        `keep_fd` handed to it; its output is discarded (it reports over that descriptor)."""
        fds = [memfd(data) for data, _, _ in files]
        binds = [(fd, path, perms) for fd, (_, path, perms) in zip(fds, files, strict=True)]
        try:
            return self._popen(command(argv, binds), uid, subprocess.DEVNULL, (*fds, keep_fd),
                               subprocess.DEVNULL)  # fmt: skip
        finally:
            for fd in fds:
                os.close(fd)

    def _popen(
        self,
        command: list[str],
        uid: int,
        stdin: int,
        pass_fds: tuple[int, ...],
        output: int,
        group: RunGroup | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start `command` as `uid` in a session of its own, with nothing of the executor's
        environment (secrets, Redis URL): bwrap also clears it inside, but the launcher and
        bwrap itself run outside the sandbox. With `group`, the launcher joins it first, before
        it drops to `uid` (on cgroup v2 only the executor's own uid may move a process there)."""
        drop: dict[str, Any] = {}
        if self._as_root and SETPRIV.exists():
            # setpriv drops to the slot's uid, not Popen(user=...): with that, Python must
            # fork a copy of the whole executor; without it, it can vfork (measured: the
            # spawn was a third of the executor's time per run)
            command = [str(SETPRIV), f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--", *command]
        elif self._as_root:
            drop = {"user": uid, "group": uid, "extra_groups": []}
        if group:
            # a run that cannot join its groups must not run without their limits: exit instead
            join = ('for f; do [ "$f" = -- ] && break; echo $$ > "$f" || exit 125; shift; done; '
                    'shift; exec "$@"')
            command = ["/bin/sh", "-c", join, "join", *group.procs_files, "--", *command]
        return subprocess.Popen(
            command,
            stdin=stdin,
            stdout=output,
            stderr=output,
            pass_fds=pass_fds,
            start_new_session=True,
            env=LAUNCH_ENV,
            cwd="/",  # the launcher's PWD reaches bwrap's init, which a run can read
            **drop,
        )

    def _spawn(
        self,
        argv: tuple[str, ...],
        files: list[tuple[bytes, str, str]],
        stdin: str | None,
        status_fd: int,
        group: RunGroup | None,
        uid: int,
        address_space_mb: int,
        limits: Limits,
        timeout: float,
        keep_fds: tuple[int, ...] = (),
        host_dirs: tuple[str, ...] = (),
    ) -> subprocess.Popen[bytes]:
        """Start bwrap (joining the run's cgroups first); inputs go in as memfds."""
        fds = [memfd(data) for data, _, _ in files]
        binds = [(fd, path, perms) for fd, (_, path, perms) in zip(fds, files, strict=True)]
        # bwrap reads the filter to its end, so each run gets its own copy
        seccomp_fd = memfd(self._seccomp) if self._seccomp is not None else None
        extra = [seccomp_fd] if seccomp_fd is not None else []
        stdin_fd = memfd((stdin or "").encode())
        try:
            command = self._command(
                argv, binds, status_fd, address_space_mb, limits, timeout, seccomp_fd, host_dirs
            )
            passed = (*fds, *extra, status_fd, *keep_fds)
            return self._popen(command, uid, stdin_fd, passed, subprocess.PIPE, group)
        finally:
            for fd in (*fds, *extra, stdin_fd, status_fd):
                os.close(fd)

    def group(
        self, uid: int, memory_mb: int, limits: Limits, processes: int | None = None
    ) -> RunGroup | None:
        """Fresh cgroups for one phase (None: rlimits only); `processes` caps the group's
        processes (the run's limit by default)."""
        if not self._cgroups:
            return None
        try:
            return self._cgroups.create(
                f"{uid}-{time.monotonic_ns()}", uid, memory_mb * 1024 * 1024, processes or limits.processes
            )
        except OSError as exc:
            raise SandboxError(f"could not set up the run's cgroups: {exc}") from exc


def memfd(data: bytes) -> int:
    """A memory-backed file holding `data`, read from its start."""
    fd = os.memfd_create("sandbox-input")
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd
