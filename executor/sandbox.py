"""Runs one submission inside bubblewrap and turns what happened into a verdict.

Isolation, outermost first:
- bwrap runs as a dedicated unprivileged uid per slot (when the executor is root), so limits
  counted per uid hold and runs cannot touch each other;
- with cgroups (see `executor.cgroups`) the run's processes share one memory limit and one
  process cap, and peak memory and OOM kills are read back exactly;
- new user, pid, net, ipc, uts and cgroup namespaces; no network device but loopback;
- a root of its own: /usr read-only (without /usr/local), fresh /proc and /dev, size-capped tmpfs at /tmp (the
  working directory) and /dev/shm, everything else absent, then / and /dev remounted read-only;
- `prlimit` sets CPU time, address space, processes, file size, open files and no core dumps;
- a wall-clock time-out kills bwrap, and with it the whole pid namespace;
- stdout and stderr are read as they come: the first `output_bytes` are kept (the rest dropped
  and the result flagged truncated); past `OUTPUT_KILL_FACTOR` times that the run is killed
  with `output_limit_exceeded`, so a flood costs neither memory nor the whole time limit.
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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import structlog

from evaluations.languages import BINARY, COMPILE_TIMEOUT_SECONDS, RUN_BINARY, Language
from executor.cgroups import CgroupsV1, RunGroup
from executor.warm import WarmSpec

log = structlog.get_logger(__name__)

READ_CHUNK = 65536
#: The whole environment the sandbox launcher (sh, bwrap) gets.
LAUNCH_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
#: util-linux's setpriv: how the launcher drops from root to a slot's uid (and no groups)
SETPRIV = Path("/usr/bin/setpriv")
#: How long a kill for a run not (yet) here makes this executor refuse to start that run.
KILL_MEMORY_SECONDS = 300.0
#: Output past this many times the kept size kills the run (`output_limit_exceeded`).
OUTPUT_KILL_FACTOR = 16
#: Exit statuses bwrap reports for a program killed by a signal (128 + signal number).
SIGNAL_EXIT_BASE = 128
#: A SIGXCPU exit is the CPU limit only if at least this share of it was used.
CPU_LIMIT_SHARE = 0.9
#: Size of the run's /dev/shm (POSIX shared memory, semaphores); /tmp and this are the only
#: writable places in the sandbox, both size-capped tmpfs.
SHM_BYTES = 16 * 1024 * 1024
#: Largest compiled binary handed from the compile sandbox to the run sandbox.
MAX_BINARY_BYTES = 64 * 1024 * 1024
#: Messages runtimes print when an allocation fails. RLIMIT_AS refuses an allocation past it
#: before any cgroup sees it and leaves no other trace, so a failed run saying so counts as out of
#: memory even with cgroups (a program could print one: it only mislabels its own failure).
OUT_OF_MEMORY_SIGNS = (
    "MemoryError",
    "Cannot allocate memory",
    "std::bad_alloc",
    "out of memory",
    "Array buffer allocation failed",  # Node
)


@dataclass(frozen=True)
class Limits:
    """What one run may use; the executor checks these against its maxima before a run."""

    timeout: float
    memory_mb: int
    output_bytes: int
    processes: int
    open_files: int
    file_size_mb: int
    tmpfs_mb: int
    compile_timeout: float = COMPILE_TIMEOUT_SECONDS
    compile_memory_mb: int = 1024


@dataclass
class RunResult:
    """The finished run, as `/execute` answers it."""

    eval_id: str
    status: str
    exit_code: int | None
    signal: int | None
    output: str
    error: str
    output_truncated: bool
    error_truncated: bool
    runtime_ms: int
    cpu_ms: int = 0
    peak_memory_kb: int = 0
    timed_out: bool = False
    limits_enforced_by: str = "rlimit"

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def cancelled(cls, eval_id: str) -> RunResult:
        """The answer for a run that was cancelled before it could start."""
        return cls(eval_id, "cancelled", None, None, "", "cancelled before it started", False, False, 0)


class SandboxBusy(Exception):
    """Every run slot is taken; the caller should try another executor or wait."""


class SandboxError(Exception):
    """The sandbox itself failed to start: our fault, never the submission's."""


@dataclass
class _Capture:
    """Bytes of one stream, up to a cap; the rest is counted and dropped."""

    cap: int
    on_flood: Callable[[], None]
    flood_at: int
    data: bytearray = field(default_factory=bytearray)
    seen: int = 0

    @property
    def truncated(self) -> bool:
        return self.seen > self.cap

    async def drain(self, stream: asyncio.StreamReader) -> None:
        while chunk := await stream.read(READ_CHUNK):
            room = self.cap - len(self.data)
            if room > 0:
                self.data += chunk[:room]
            self.seen += len(chunk)
            if self.seen > self.flood_at:
                self.on_flood()

    def text(self) -> str:
        return self.data.decode("utf-8", errors="replace")


@dataclass
class _Outcome:
    """How one sandboxed process ended."""

    exit_code: int | None
    signal: int | None
    stdout: _Capture
    stderr: _Capture
    wall_ms: int
    cpu_ms: int
    peak_rss_kb: int
    timed_out: bool
    flooded: bool
    oom_killed: bool = False


@dataclass
class _Run:
    eval_id: str
    language: str
    started_at: float = field(default_factory=time.time)
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: bool = False
    pid: int | None = None

    def kill(self) -> None:
        # bwrap's --die-with-parent takes the whole pid namespace down with it.
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)


@dataclass
class _Started:
    """A spawned sandbox and what must be read and undone when it ends."""

    process: subprocess.Popen[bytes]
    group: RunGroup | None
    status_read: int


@dataclass
class _Warm:
    """A pre-started Python sandbox waiting for its code on `code_write` (executor/warm.py)."""

    started: _Started
    code_write: int

    def discard(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.started.process.pid, signal.SIGKILL)
        self.started.process.wait()
        if self.code_write >= 0:
            os.close(self.code_write)
        os.close(self.started.status_read)
        if self.started.group:
            self.started.group.remove()


class Sandbox:
    """Builds bwrap command lines and supervises runs; one instance per executor."""

    def __init__(
        self,
        bwrap: Path,
        *,
        uid_base: int,
        slots: int,
        cgroups: CgroupsV1 | None,
        seccomp: bytes | None = None,
    ) -> None:
        self.bwrap = bwrap
        self.cgroups = cgroups
        self.seccomp = seccomp
        self._as_root = os.geteuid() == 0
        #: the uid each run slot's sandboxes run as
        self._uids = [uid_base + slot if self._as_root else os.geteuid() for slot in range(slots)]
        self._free_slots: asyncio.Queue[int] = asyncio.Queue()
        for slot in range(slots):
            self._free_slots.put_nowait(slot)
        self.capacity = slots
        self.running: dict[str, _Run] = {}
        self._killed_early: dict[str, float] = {}
        #: set by `warm_up`: pre-started Python sandboxes, one per free slot
        self.warm_spec: WarmSpec | None = None
        self._warm: dict[int, _Warm] = {}
        self._busy: set[int] = set()

    @property
    def enforced_by(self) -> str:
        return "cgroup-v1" if self.cgroups else "rlimit"

    def command(
        self,
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
            str(self.bwrap),
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

    async def run(
        self,
        eval_id: str,
        language: Language,
        code: str,
        limits: Limits,
        stdin: str | None = None,
        args: tuple[str, ...] = (),
    ) -> RunResult:
        """Compile if the language needs it, run, and return the verdict.

        A run cancelled before it arrived is not started. A second request for a run still in
        progress replaces it: its worker has given up on it (died, or was stopped). With every
        slot taken it raises `SandboxBusy` at once rather than queue work nobody may wait for.
        """
        if self._was_killed_early(eval_id):
            return RunResult.cancelled(eval_id)
        while (earlier := self.running.get(eval_id)) is not None:  # another may replace it too
            log.warning("sandbox.replaced", eval_id=eval_id)
            self.kill(eval_id, remember=False)
            await earlier.finished.wait()
        if self._free_slots.empty():
            raise SandboxBusy(self.capacity)
        slot = self._free_slots.get_nowait()
        self._busy.add(slot)
        uid = self._uids[slot]
        run = self.running[eval_id] = _Run(eval_id, language.name)
        warm = self._warm.pop(slot, None)
        try:
            if warm and self.warm_spec and self.warm_spec.serves(language, limits, stdin, args):
                outcome = await self._run_warm(run, warm, code, limits)
                log.info("sandbox.warm_start", taken=outcome is not None)
                if outcome is not None:
                    return self._verdict(run, outcome, limits)
            elif warm:
                warm.discard()
            return await self._compile_and_run(run, uid, language, code, limits, stdin, args)
        finally:
            if self.running.get(eval_id) is run:
                del self.running[eval_id]
            run.finished.set()
            self._busy.discard(slot)
            self._free_slots.put_nowait(slot)
            # once the answer is on its way: the slot's next warm sandbox
            asyncio.get_running_loop().call_soon(self._rewarm, slot)

    def warm_up(self, spec: WarmSpec) -> None:
        """Keep a pre-started sandbox for `spec` in every free slot from now on."""
        self.warm_spec = spec
        for slot in range(self.capacity):
            self._rewarm(slot)

    def _rewarm(self, slot: int) -> None:
        """Start a warm sandbox for a free slot (one taken meanwhile starts its run cold)."""
        if self.warm_spec is None or slot in self._warm or slot in self._busy:
            return
        try:
            self._warm[slot] = self._prewarm(self._uids[slot], self.warm_spec)
        except (OSError, SandboxError) as exc:
            log.warning("sandbox.prewarm_failed", error=str(exc))

    def _prewarm(self, uid: int, spec: WarmSpec) -> _Warm:
        code_read, code_write = os.pipe()
        try:
            started = self._start(uid, spec.argv(code_read), [], None, spec.limits, spec.limits.memory_mb,
                                  spec.limits.timeout, spec.language, keep_fds=(code_read,))  # fmt: skip
        except BaseException:
            os.close(code_write)
            raise
        finally:
            os.close(code_read)
        return _Warm(started, code_write)

    async def _run_warm(self, run: _Run, warm: _Warm, code: str, limits: Limits) -> _Outcome | None:
        """Hand the code to a warm sandbox; from then on it is supervised as a cold run is.

        None if it is gone (it died waiting, or its loader failed): the run then starts cold,
        so nothing of ours is ever reported as the submission's failure.
        """
        try:
            if warm.started.process.poll() is not None:
                raise BrokenPipeError("the warm sandbox had ended")
            await asyncio.get_running_loop().run_in_executor(
                None, _write_and_close, warm.code_write, code.encode()
            )
        except BaseException as exc:
            # gone, or this run was cancelled mid-handover: either way the sandbox must not
            # go on unsupervised (the writing thread closes the pipe itself)
            warm.code_write = -1
            warm.discard()
            if not isinstance(exc, OSError):
                raise
            log.warning("sandbox.warm_lost", eval_id=run.eval_id, error=str(exc))
            return None
        return await self._supervised(
            run, warm.started, limits.timeout, (limits.output_bytes, limits.output_bytes)
        )

    async def _compile_and_run(
        self,
        run: _Run,
        uid: int,
        language: Language,
        code: str,
        limits: Limits,
        stdin: str | None,
        args: tuple[str, ...],
    ) -> RunResult:
        source = [(code.encode(), f"/sandbox/{language.file_name}", "0444")]
        if language.compile:
            built = await self._phase(run, uid, language.compile, source, None, limits, compile_step=True)
            if run.cancelled or built.exit_code != 0 or built.timed_out or built.flooded:
                return self._verdict(run, built, limits, compile_step=True)
            source = [(bytes(built.stdout.data), RUN_BINARY, "0555")]
        outcome = await self._phase(
            run, uid, (*language.run, *args), source, stdin, limits, language=language
        )
        return self._verdict(run, outcome, limits)

    async def _phase(
        self,
        run: _Run,
        uid: int,
        argv: tuple[str, ...],
        files: list[tuple[bytes, str, str]],
        stdin: str | None,
        limits: Limits,
        *,
        compile_step: bool = False,
        language: Language | None = None,
    ) -> _Outcome:
        """One sandboxed process, from spawn to reaped, with its usage."""
        if compile_step:
            # the compiler writes the binary to /tmp; a shell inside the sandbox then streams it
            # to stdout, which is where the run's sandbox gets it from
            argv = ("/bin/sh", "-c", '"$@" >&2 && cat ' + BINARY, "compile", *argv)
            timeout, memory_mb, out_cap = limits.compile_timeout, limits.compile_memory_mb, MAX_BINARY_BYTES
        else:
            timeout, memory_mb, out_cap = limits.timeout, limits.memory_mb, limits.output_bytes
        started = self._start(uid, argv, files, stdin, limits, memory_mb, timeout, language)
        return await self._supervised(run, started, timeout, (out_cap, limits.output_bytes))

    def _start(
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
    ) -> _Started:
        """Spawn one sandboxed process in fresh cgroups; `keep_fds` are handed to it too."""
        # With cgroups the group holds memory; RLIMIT_AS then only stops absurd reservations
        # (a refused one still reads as out of memory: see OUT_OF_MEMORY_SIGNS).
        lang_min = language.min_address_space_mb if language else 0
        address_space = max(memory_mb * (4 if self.cgroups else 1), lang_min)
        group = self._group(uid, memory_mb, limits)
        status_read, status_write = os.pipe()
        try:
            process = self._spawn(
                argv, files, stdin, status_write, group, uid, address_space, limits, timeout, keep_fds
            )
        except BaseException:
            os.close(status_read)
            if group:
                group.remove()
            raise
        return _Started(process, group, status_read)

    async def _supervised(
        self, run: _Run, started: _Started, timeout: float, caps: tuple[int, int]
    ) -> _Outcome:
        """Supervise a started sandbox to its end; read its usage and undo its cgroups."""
        group = started.group
        try:
            run.pid = started.process.pid
            # a kill that came while the process was spawned, or while a warm one got its code
            if run.cancelled or self._was_killed_early(run.eval_id):
                run.cancelled = True
                run.kill()
            outcome = await _supervise(run, started.process, timeout, caps)
        finally:
            run.pid = None
            status = _read_all(started.status_read)
            stats = group.stats() if group else None
            if group:
                group.remove()
        if stats:
            outcome.peak_rss_kb = max(outcome.peak_rss_kb, stats.peak_memory_bytes // 1024)
            outcome.oom_killed = stats.oom_killed
            outcome.cpu_ms = max(outcome.cpu_ms, stats.cpu_ns // 1_000_000)
        # bwrap writes "exit-code" only once its own set-up (mounts included, which come after
        # the clone that writes "child-pid") ended in a successful exec; without it the program
        # never ran, unless we ourselves killed bwrap first
        we_stopped_it = run.cancelled or outcome.timed_out or outcome.flooded or outcome.oom_killed
        if '"exit-code"' not in status and not we_stopped_it:
            raise SandboxError(f"bwrap did not start the program: {outcome.stderr.text()[:500]}")
        # bwrap reports a signal as 128 + N, which a program can also exit with: SIGXCPU only
        # counts as the CPU limit when the CPU time was really spent
        if outcome.signal == signal.SIGXCPU and outcome.cpu_ms >= CPU_LIMIT_SHARE * timeout * 1000:
            outcome.timed_out = True
        return outcome

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
    ) -> subprocess.Popen[bytes]:
        """Start bwrap (joining the run's cgroups first); inputs go in as memfds."""
        fds = [_memfd(data) for data, _, _ in files]
        binds = [(fd, path, perms) for fd, (_, path, perms) in zip(fds, files, strict=True)]
        # bwrap reads the filter to its end, so each run gets its own copy
        seccomp_fd = _memfd(self.seccomp) if self.seccomp is not None else None
        extra = [seccomp_fd] if seccomp_fd is not None else []
        stdin_fd = _memfd((stdin or "").encode())
        try:
            command = self.command(argv, binds, status_fd, address_space_mb, limits, timeout, seccomp_fd)
            if group:
                join = 'for f; do [ "$f" = -- ] && break; echo $$ > "$f"; shift; done; shift; exec "$@"'
                command = ["/bin/sh", "-c", join, "join", *group.procs_files, "--", *command]
            drop: dict[str, Any] = {}
            if self._as_root and SETPRIV.exists():
                # setpriv drops to the slot's uid, not Popen(user=...): with that, Python must
                # fork a copy of the whole executor; without it, it can vfork (measured: the
                # spawn was a third of the executor's time per run)
                command = [str(SETPRIV), f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--", *command]
            elif self._as_root:
                drop = {"user": uid, "group": uid, "extra_groups": []}
            return subprocess.Popen(
                command,
                stdin=stdin_fd,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                pass_fds=(*fds, *extra, status_fd, *keep_fds),
                start_new_session=True,
                # Not the executor's environment (secrets, Redis URL): bwrap also clears it
                # inside, but the launcher and bwrap itself run outside the sandbox.
                env=LAUNCH_ENV,
                cwd="/",  # the launcher's PWD reaches bwrap's init, which a run can read
                **drop,
            )
        finally:
            for fd in (*fds, *extra, stdin_fd, status_fd):
                os.close(fd)

    def _group(self, uid: int, memory_mb: int, limits: Limits) -> RunGroup | None:
        """Fresh cgroups for one phase (None: rlimits only)."""
        if not self.cgroups:
            return None
        try:
            return self.cgroups.create(
                f"{uid}-{time.monotonic_ns()}", uid, memory_mb * 1024 * 1024, limits.processes
            )
        except OSError as exc:
            raise SandboxError(f"could not set up the run's cgroups: {exc}") from exc

    def _verdict(self, run: _Run, o: _Outcome, limits: Limits, compile_step: bool = False) -> RunResult:
        error = o.stderr.text()
        # a cgroup OOM kill, or an allocation the address-space limit refused (one too large
        # for it, even if far below the cgroup's limit in use so far)
        out_of_memory = o.oom_killed or (
            o.exit_code not in (0, None) and any(sign in error for sign in OUT_OF_MEMORY_SIGNS)
        )
        if run.cancelled:
            status = "cancelled"
        elif o.timed_out:
            status = "timeout"
            error += (
                f"\nTime limit of {limits.compile_timeout if compile_step else limits.timeout:g}s exceeded"
            )
        elif o.flooded:
            status = "output_limit_exceeded"
            error += f"\nOutput limit exceeded: more than {OUTPUT_KILL_FACTOR} x {limits.output_bytes} bytes"
        elif out_of_memory:
            status = "memory_limit_exceeded"
            memory_mb = limits.compile_memory_mb if compile_step else limits.memory_mb
            error += f"\nMemory limit of {memory_mb} MB exceeded"
        elif o.exit_code == 0:
            status = "completed"
        else:
            status = "compile_error" if compile_step else "failed"
        output = "" if compile_step else o.stdout.text()
        return RunResult(
            eval_id=run.eval_id,
            status=status,
            exit_code=o.exit_code,
            signal=o.signal,
            output=output,
            error=error,
            output_truncated=False if compile_step else o.stdout.truncated,
            error_truncated=o.stderr.truncated,
            runtime_ms=o.wall_ms,
            cpu_ms=o.cpu_ms,
            peak_memory_kb=o.peak_rss_kb,
            timed_out=o.timed_out,
            limits_enforced_by=self.enforced_by,
        )

    def kill(self, eval_id: str, remember: bool = True) -> bool:
        """Stop a run now; its result comes back as `cancelled`.

        False if no such run. With `remember`, a request for it in the next minutes is then
        refused, so a cancel racing the run's start still wins; a worker abandoning only its
        own attempt (shutting down) does not remember, so the next delivery can run.
        """
        run = self.running.get(eval_id)
        if run is None:
            if remember:
                self._killed_early[eval_id] = time.monotonic()
            return False
        run.cancelled = True
        run.kill()
        return True

    def _was_killed_early(self, eval_id: str) -> bool:
        horizon = time.monotonic() - KILL_MEMORY_SECONDS
        for stale in [k for k, at in self._killed_early.items() if at < horizon]:
            del self._killed_early[stale]
        return self._killed_early.pop(eval_id, None) is not None

    async def shutdown(self) -> None:
        """Kill every run and every warm sandbox, so none outlives the executor."""
        self.warm_spec = None
        for run in list(self.running.values()):
            run.kill()
        while self._warm:
            self._warm.popitem()[1].discard()

    @property
    def warm(self) -> int:
        """Pre-started sandboxes waiting for code."""
        return len(self._warm)


async def _supervise(
    run: _Run, process: subprocess.Popen[bytes], timeout: float, caps: tuple[int, int]
) -> _Outcome:
    """Read both streams (each up to its cap), enforce the wall time, reap with resource usage."""
    loop = asyncio.get_running_loop()
    flooded = False

    def flood() -> None:
        nonlocal flooded
        flooded = True
        run.kill()

    out, err = (_Capture(cap, flood, cap * OUTPUT_KILL_FACTOR) for cap in caps)
    started = time.perf_counter()
    readers = [await _reader(loop, pipe) for pipe in (process.stdout, process.stderr)]
    io = asyncio.gather(out.drain(readers[0]), err.drain(readers[1]), _wait(loop, process))
    timed_out = False
    try:
        await asyncio.wait_for(asyncio.shield(io), timeout=timeout)
    except TimeoutError:
        timed_out = True
        run.kill()
        await io
    except BaseException:
        run.kill()
        await asyncio.gather(io, return_exceptions=True)
        raise
    wall_ms = int((time.perf_counter() - started) * 1000)
    _, _, (status, usage) = io.result()
    code = os.waitstatus_to_exitcode(status)
    sig = -code if code < 0 else (code - SIGNAL_EXIT_BASE if code > SIGNAL_EXIT_BASE else None)
    return _Outcome(
        exit_code=code if code >= 0 else None,
        signal=sig,
        stdout=out,
        stderr=err,
        wall_ms=wall_ms,
        cpu_ms=int((usage.ru_utime + usage.ru_stime) * 1000),
        peak_rss_kb=usage.ru_maxrss,
        timed_out=timed_out,
        flooded=flooded and not timed_out,
    )


async def _reader(loop: asyncio.AbstractEventLoop, pipe: object) -> asyncio.StreamReader:
    reader = asyncio.StreamReader(limit=READ_CHUNK * 4)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), pipe)
    return reader


async def _wait(
    loop: asyncio.AbstractEventLoop, process: subprocess.Popen[bytes]
) -> tuple[int, resource.struct_rusage]:
    """Reap `process` without blocking the loop (pidfd), keeping the resource usage of it and
    every descendant it reaped, which asyncio's own subprocess support throws away."""
    pidfd = os.pidfd_open(process.pid)
    done: asyncio.Future[tuple[int, resource.struct_rusage]] = loop.create_future()

    def ready() -> None:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid and not done.done():
            process.returncode = os.waitstatus_to_exitcode(status)
            done.set_result((status, usage))

    loop.add_reader(pidfd, ready)
    try:
        return await done
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)


def _write_and_close(fd: int, data: bytes) -> None:
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def _memfd(data: bytes) -> int:
    fd = os.memfd_create("sandbox-input")
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _read_all(fd: int) -> str:
    chunks = []
    with contextlib.suppress(OSError):
        os.set_blocking(fd, False)
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks).decode(errors="replace")
