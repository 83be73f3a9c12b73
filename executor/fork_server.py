"""Fork servers: a Python interpreter started once per run slot, forked once per run.

A cold Python run pays for bwrap, two launchers and an interpreter's start-up (plus whatever
it imports) in CPU on every run. A slot's fork server (`executor/fork_server_program.py`, run
as the slot's uid in a sandbox of its own) has done that once, with the modules submissions
commonly use already imported; each run is a fork of it that enters namespaces, a cgroup,
rlimits, a capability-less state and the seccomp filter of its own before running the code
(the program's docstring has the steps). Sandbox2's fork server, Android's zygote and go-judge's
pre-forked environments work the same way.

The executor keeps one socket per server (SOCK_SEQPACKET: one message per read). Per run it
sends a JSON header with the run's inputs and output pipes as file descriptors; the server
answers "started" with a pidfd of the run's pid 1 (its kill), then how the run ended. Anything
else (no answer in time, a closed socket, a run cut short mid-protocol, the program not
started) retires the server at once, and a new one starts; so does every `runs_per_server`
runs. A run whose slot has no ready server starts cold.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import IO, Any

import structlog

from evaluations.languages import Language
from executor.bwrap_command import MASKED_PROC_DIRS, MASKED_PROC_FILES, SHM_BYTES, rlimits
from executor.cgroups import RunGroup
from executor.errors import SandboxError
from executor.limits import Limits
from executor.slots import Slots
from executor.spawn import Spawner, memfd

log = structlog.get_logger(__name__)

PROGRAM = Path(__file__).with_name("fork_server_program.py")
#: Modules the server imports before its first fork, so no run pays for them: what
#: "function + unit tests" programs commonly import, and traceback (a failing run's printer).
PRELOAD = (
    "traceback", "linecache", "tokenize", "unittest", "collections", "itertools", "functools",
    "re", "math", "typing", "dataclasses", "json", "random", "string", "heapq", "bisect", "copy",
    "enum", "datetime", "decimal", "fractions", "statistics", "operator", "textwrap", "io",
)  # fmt: skip
#: A run's message to its server; the run's header goes in a memfd its init alone reads.
RUN_MESSAGE = b'{"kind": "run"}'
#: How long a server may take to start (with its preloads) and to start a run.
READY_TIMEOUT_S = 15.0
START_TIMEOUT_S = 5.0
#: Processes of the slot's uid that a forked run has beside its program and a cold run has
#: not (the server, its bwrap and bwrap's init, and the run's init, less a cold run's bwrap
#: and its init): the process rlimit counts every process of the uid, so it is raised by as many.
EXTRA_PROCESSES = 2


@cache
def program_source() -> bytes:
    """The server's program, read once (every server start hands it in)."""
    return PROGRAM.read_bytes()


class ForkServerGone(SandboxError):
    """The server did not answer as it should: it is retired and the run starts cold."""


@dataclass(frozen=True)
class Phase:
    """One sandboxed process a fork server starts: its files in /sandbox (content, path,
    permissions), stdin, memory limit (MB) and CPU seconds, and either a command to exec
    (`exec_argv`) or, with None, the Python code in /sandbox/main.py run in the interpreter
    itself with `args`."""

    files: list[tuple[bytes, str, str]]
    stdin: str | None
    memory_mb: int
    cpu_s: float
    language: Language | None
    exec_argv: tuple[str, ...] | None
    args: tuple[str, ...] = ()


@dataclass
class Usage:
    ru_utime: float
    ru_stime: float
    ru_maxrss: int


class ForkServer:
    """One slot's server: its sandbox's process and the executor's end of its socket."""

    def __init__(self, process: subprocess.Popen[bytes], sock: socket.socket) -> None:
        self.process = process
        self.sock = sock
        self.runs = 0
        self.retired = False
        #: the cgroups of the run's init the server has prepared (made ahead: see `prepare`)
        self.prepared: RunGroup | None = None
        #: set while a message is awaited: `retire` ends the wait
        self._waiting: asyncio.Future[None] | None = None

    async def receive(self, timeout: float | None = None) -> tuple[dict[str, Any], list[int]]:
        """The server's next message and the descriptors it carried (the caller's to close);
        `ForkServerGone` if it closed, said nothing in time, was retired meanwhile or sent
        something that is not a message (then nothing it sent stays open here)."""
        loop = asyncio.get_running_loop()
        while True:
            if self.retired:
                raise ForkServerGone("the fork server was retired")
            try:
                message, received, _, _ = socket.recv_fds(self.sock, 65536, 4)
            except BlockingIOError:
                await self._readable(loop, timeout)
                continue
            except OSError as exc:
                raise ForkServerGone(f"the fork server's socket failed: {exc}") from exc
            if not message:
                _close(received)
                raise ForkServerGone("the fork server has gone")
            try:
                answer = json.loads(message)
            except ValueError:
                answer = None
            if not isinstance(answer, dict):
                _close(received)
                raise ForkServerGone(f"the fork server answered {message[:200]!r}")
            return answer, received

    async def receive_plain(self, timeout: float | None = None) -> dict[str, Any]:
        """The server's next message, which carries no descriptor (any it sent is closed)."""
        answer, received = await self.receive(timeout)
        _close(received)
        return answer

    async def _readable(self, loop: asyncio.AbstractEventLoop, timeout: float | None) -> None:
        ready = self._waiting = loop.create_future()
        loop.add_reader(self.sock, lambda: ready.done() or ready.set_result(None))
        try:
            await asyncio.wait_for(ready, timeout)
        except TimeoutError:
            raise ForkServerGone("the fork server did not answer in time") from None
        finally:
            self._waiting = None
            if not self.retired:
                loop.remove_reader(self.sock)

    def retire(self) -> None:
        """Kill the server (its sandbox, and with it any run it still has) and forget it."""
        if self.retired:
            return
        self.retired = True
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        if self._waiting is not None:
            asyncio.get_running_loop().remove_reader(self.sock)
            if not self._waiting.done():
                self._waiting.set_exception(ForkServerGone("the fork server was retired"))
        self.sock.close()
        if self.prepared is not None:  # its init died with the server
            self.prepared.remove()
            self.prepared = None
        with contextlib.suppress(RuntimeError):  # no loop: reaped at once instead
            asyncio.get_running_loop().run_in_executor(None, self.process.wait)
            return
        self.process.wait()


@dataclass
class Forked:
    """A run forked by a server (a `executor.program.Program`)."""

    server: ForkServer
    group: RunGroup | None
    stdout: IO[bytes]
    stderr: IO[bytes]
    pidfd: int
    ran: bool = False
    #: whether `wait` has ended, and whether `finish` was called
    ended: bool = False
    finished: bool = False

    @property
    def pid(self) -> int | None:
        """The run's pid 1 as the host sees it."""
        with contextlib.suppress(OSError), open(f"/proc/self/fdinfo/{self.pidfd}") as info:
            for line in info:
                if line.startswith("Pid:"):
                    return int(line.split()[1])
        return None

    def kill(self) -> None:
        with contextlib.suppress(OSError):  # its pid 1: the whole pid namespace goes with it
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)

    async def wait(self) -> tuple[int, Usage]:
        try:
            report = await self.server.receive_plain()
        except ForkServerGone:
            # retired with the run still going (stuck, killed): its end is its init's end,
            # which waits for every process of its pid namespace
            await _exited(self.pidfd)
            raise
        except BaseException:
            self.server.retire()  # cut short: the server's next message would be this run's
            raise
        finally:
            self.ended = True
            if self.finished:
                os.close(self.pidfd)
        if "status" not in report:
            self.server.retire()
            raise ForkServerGone(f"the fork server failed: {report.get('error')}")
        self.ran = bool(report["ran"])
        if report.get("error"):
            log.warning("fork_server.set_up_failed", error=report.get("error"))
        return int(report["status"]), Usage(report["utime"], report["stime"], report["maxrss"])

    def finish(self) -> bool:
        """Its pidfd is closed once both this and `wait` have ended (a run still lingering
        is waited for through it); its output pipes are their readers' to close."""
        self.finished = True
        if self.ended:
            os.close(self.pidfd)
        else:
            self.server.retire()
        return self.ran


def _close(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


async def _exited(pidfd: int) -> None:
    """Until the process of `pidfd` has ended (a pidfd reads as ready then)."""
    loop = asyncio.get_running_loop()
    ended = loop.create_future()
    loop.add_reader(pidfd, lambda: ended.done() or ended.set_result(None))
    try:
        await ended
    finally:
        loop.remove_reader(pidfd)


class ForkServers:
    """One fork server per slot for one language (Python), each started as the slot's uid."""

    def __init__(
        self,
        spawner: Spawner,
        slots: Slots,
        launch: Callable[[tuple[str, ...], list[tuple[int, str, str]]], list[str]],
        seccomp: bytes | None,
        language: Language,
        runs_per_server: int,
        default_limits: Limits,
    ) -> None:
        self._spawner = spawner
        self._slots = slots
        self._launch = launch
        self._seccomp = seccomp
        self.language = language
        self._runs_per_server = runs_per_server
        self._default_limits = default_limits
        self._servers: dict[int, ForkServer] = {}
        self._starting: dict[int, asyncio.Task[None]] = {}
        #: slots whose last run's end is still to be seen to (`after_run`), with the call to do it
        self._ending: dict[int, asyncio.Handle] = {}
        self._closed = False

    def __len__(self) -> int:
        """Servers ready for a run."""
        return len(self._servers)

    def fill(self) -> None:
        for slot in range(self._slots.capacity):
            self.refill(slot)

    def refill(self, slot: int) -> None:
        """Start the slot's server if it has none (it answers runs once it is ready)."""
        if self._closed or slot in self._servers or slot in self._starting:
            return
        task = asyncio.get_running_loop().create_task(self._start(slot))
        self._starting[slot] = task
        task.add_done_callback(lambda _: self._starting.pop(slot, None))

    async def _start(self, slot: int) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setblocking(False)
        config = {
            "preload": PRELOAD,
            "shm_bytes": SHM_BYTES,
            "masked_files": MASKED_PROC_FILES,
            "masked_dirs": MASKED_PROC_DIRS,
        }
        files = [(program_source(), "/sandbox/main.py", "0444"),
                 (json.dumps(config).encode(), "/sandbox/config.json", "0444")]  # fmt: skip
        if self._seccomp is not None:
            files.append((self._seccomp, "/sandbox/seccomp.bpf", "0444"))
        try:
            with theirs:
                process = self._spawner.launch(
                    self._slots.uids[slot], self.language.run, files, self._launch, theirs.fileno()
                )
        except (OSError, SandboxError) as exc:
            ours.close()
            log.warning("fork_server.start_failed", slot=slot, error=str(exc))
            return
        server = ForkServer(process, ours)
        try:
            hello = await server.receive_plain(READY_TIMEOUT_S)
            if not hello.get("ready"):
                raise ForkServerGone(f"the fork server failed to start: {hello.get('error')}")
        except (ForkServerGone, asyncio.CancelledError) as exc:
            server.retire()
            log.warning("fork_server.start_failed", slot=slot, error=str(exc))
            return
        if self._closed:
            server.retire()
            return
        self._servers[slot] = server
        self._prepare(slot, server)

    def _prepare(self, slot: int, server: ForkServer) -> None:
        """Have the server make the next run's init ahead, in fresh cgroups: its namespaces,
        mounts and loopback then cost the run no time. The cgroups get the run's own limits
        when it comes."""
        defaults = self._default_limits
        group = self._spawner.group(self._slots.uids[slot], defaults.memory_mb, defaults)
        theirs = [os.open(path, os.O_WRONLY | os.O_CLOEXEC) for path in group.procs_files] if group else []
        header = {"kind": "prepare", "tmpfs_bytes": defaults.tmpfs_mb * 1024 * 1024}
        try:
            socket.send_fds(server.sock, [json.dumps(header).encode()], theirs)
        except OSError as exc:
            if group:
                group.remove()
            log.warning("fork_server.prepare_failed", slot=slot, error=str(exc))
            self.retire(slot)
            return
        finally:
            for fd in theirs:
                os.close(fd)
        server.prepared = group

    def prepare_next(self, slot: int) -> None:
        """Within one run of several phases (a submission's cases): have the slot's server make
        the next phase's init now, while the last one's output is checked, rather than when the
        next phase starts."""
        server = self._servers.get(slot)
        if server is not None and not server.retired and server.prepared is None:
            self._prepare(slot, server)

    def serves(self, language: Language) -> bool:
        """Whether runs of `language` run in this interpreter (others exec their command)."""
        return language == self.language

    async def start(self, slot: int, phase: Phase, limits: Limits) -> Forked | None:
        """Fork the slot's server for one phase of a run (a compile step, or the run), in
        fresh cgroups; None if it has no ready server (the phase then starts cold). Raises
        `ForkServerGone` if the server failed before the phase started (it is retired; the
        phase may start cold). A language reading host folders beside /usr (`host_dirs`)
        starts cold too: the server's root has only /usr."""
        self._end_run(slot)  # the slot's last run's, if not seen to yet: before this one's
        server = self._servers.get(slot)
        if server is None or (phase.language is not None and phase.language.host_dirs):
            return None
        if server.prepared is None:
            self._prepare(slot, server)
            if server.retired:
                return None
        server.runs += 1
        group, server.prepared = server.prepared, None
        address_space = self._spawner.address_space_mb(phase.memory_mb, phase.language)
        limit_by_name = rlimits(limits, address_space, phase.cpu_s)
        nproc = limits.processes + EXTRA_PROCESSES
        limit_by_name["RLIMIT_NPROC"] = (nproc, nproc)
        header = {
            "tmpfs_bytes": limits.tmpfs_mb * 1024 * 1024,
            "rlimits": limit_by_name,
            "files": [(path, int(perms, 8)) for _, path, perms in phase.files],
            "exec": phase.exec_argv,
            "args": phase.args,
            "workdir": limits.workdir,
        }
        out_read, out_write = os.pipe()
        err_read, err_write = os.pipe()
        theirs = [
            memfd(json.dumps(header).encode()),
            memfd((phase.stdin or "").encode()),
            out_write,
            err_write,
        ]
        theirs += [memfd(data) for data, _, _ in phase.files]
        stdout, stderr = os.fdopen(out_read, "rb", 0), os.fdopen(err_read, "rb", 0)
        try:
            if group:
                # a cold run's cgroups hold bwrap and its init beside the program, a forked
                # run's only its init: one process fewer, so the program may start as many
                try:
                    group.limit(phase.memory_mb * 1024 * 1024, limits.processes - 1)
                except OSError as exc:  # the phase starts cold, in cgroups of its own
                    raise ForkServerGone(f"could not set the prepared cgroups' limits: {exc}") from exc
            try:
                socket.send_fds(server.sock, [RUN_MESSAGE], theirs)
            except OSError as exc:
                raise ForkServerGone(f"the fork server has gone: {exc}") from exc
            started, pidfds = await server.receive(START_TIMEOUT_S)
            if not started.get("started") or len(pidfds) != 1:
                _close(pidfds)
                raise ForkServerGone(f"the fork server could not start a run: {started.get('error')}")
        except BaseException:
            self.retire(slot)
            stdout.close()
            stderr.close()
            if group:
                group.remove()
            raise
        finally:
            for fd in theirs:
                os.close(fd)
        return Forked(server, group, stdout, stderr, pidfds[0])

    def after_run(self, slot: int) -> None:
        """A run of the slot ended (its slot is free): its server is seen to in the loop's next
        turn, once the answer is on its way, or by the slot's next run (`start`) if that comes
        first. Either way once, before that run touches the server, never under it."""
        if slot not in self._ending:
            self._ending[slot] = asyncio.get_running_loop().call_soon(self._end_run, slot)

    def _end_run(self, slot: int) -> None:
        """`after_run`'s work, if still to do: a server retired meanwhile, or done with its
        runs, is replaced now, before the slot's next run; else it prepares the next run's init."""
        handle = self._ending.pop(slot, None)
        if handle is None:
            return
        handle.cancel()  # (called by `start`: the call is not needed any more)
        server = self._servers.get(slot)
        if server is not None and server.retired:
            del self._servers[slot]
        elif server is not None and server.runs >= self._runs_per_server:
            self.retire(slot)
        elif server is not None and server.prepared is None:
            self._prepare(slot, server)
        self.refill(slot)

    def retire(self, slot: int) -> None:
        server = self._servers.pop(slot, None)
        if server is not None:
            log.info("fork_server.retired", slot=slot, runs=server.runs)
            server.retire()

    def close(self) -> None:
        """Kill every server and start no more, so none outlives the executor."""
        self._closed = True
        for task in self._starting.values():
            task.cancel()
        for handle in self._ending.values():
            handle.cancel()
        self._ending.clear()
        for slot in list(self._servers):
            self.retire(slot)
