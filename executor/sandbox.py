"""Runs one submission inside bubblewrap and turns what happened into a verdict.

Isolation, outermost first:
- bwrap runs as a dedicated unprivileged uid per slot (when the executor is root), so limits
  counted per uid hold and runs cannot touch each other;
- with cgroups (see `executor.cgroups`) the run's processes share one memory limit and one
  process cap, and peak memory and OOM kills are read back exactly;
- new user, pid, net, ipc, uts and cgroup namespaces; no network device but loopback;
- a root of its own: /usr read-only (without /usr/local), fresh /proc and /dev, size-capped tmpfs at /tmp (the
  working directory) and /dev/shm, everything else absent, then /, /dev and /proc remounted
  read-only;
- `prlimit` sets CPU time, address space, processes, file size, open files and no core dumps;
- a wall-clock time-out kills bwrap, and with it the whole pid namespace;
- output is kept up to a cap, and a flood kills the run (`executor.supervise`).
Inputs go in through memfds, never files on the host (`executor.spawn`).

Python runs are forked from their slot's fork server (`executor.fork_server`) where it has
one ready, with the same isolation built per run; other runs, and any a server cannot take,
start cold.

`Sandbox` only composes the parts: run slots (`executor.slots`), the fork servers
(`executor.fork_server`), the command line (`executor.bwrap_command`), spawning
(`executor.spawn`), supervision (`executor.supervise`) and the verdict (`executor.verdict`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import structlog

from evaluations.languages import BINARY, RUN_BINARY, Language
from executor.bwrap_command import bwrap_command, fork_server_command
from executor.cgroups import Cgroups, Enforcement
from executor.compile_cache import CompileCache
from executor.errors import SandboxError
from executor.fork_server import ForkServerGone, ForkServers, Phase
from executor.limits import Limits
from executor.outcome import Outcome
from executor.runs import KillMemory, Run
from executor.slots import Slots
from executor.spawn import Spawner
from executor.supervise import Deadlines, supervise
from executor.verdict import RunResult, verdict

log = structlog.get_logger(__name__)

#: Largest compiled binary handed from the compile sandbox to the run sandbox.
MAX_BINARY_BYTES = 64 * 1024 * 1024


class Sandbox:
    """Runs submissions in isolated processes and answers with their verdicts; one per executor."""

    def __init__(
        self,
        bwrap: Path,
        *,
        uid_base: int,
        slots: int,
        cgroups: Cgroups | None,
        seccomp: bytes | None = None,
        compile_cache_bytes: int = 0,
        enforcement: Enforcement | None = None,
    ) -> None:
        self.bwrap = bwrap
        self.cgroups = cgroups
        #: which per-run limits hold (`/health`): the backend's own, or why there is none
        self.enforcement = enforcement or (
            cgroups.enforcement() if cgroups else Enforcement.rlimits_only("no cgroups given")
        )
        self.seccomp = seccomp
        as_root = os.geteuid() == 0
        self._slots = Slots(uid_base, slots, as_root)
        self.capacity = slots
        self.running: dict[str, Run] = {}
        self._kills = KillMemory()
        # `self.command`, not the function: a subclass may change the line every run gets
        self._spawner = Spawner(self.command, cgroups, seccomp, as_root)
        self._forks: ForkServers | None = None
        #: binaries of successful compile steps (`executor.compile_cache`)
        self.compiled = CompileCache(compile_cache_bytes)

    @property
    def enforced_by(self) -> str:
        return self.cgroups.kind if self.cgroups else "rlimit"

    def command(self, argv: tuple[str, ...], *rest: Any, **options: Any) -> list[str]:
        """The full argv for one sandboxed program: `bwrap_command` with this sandbox's bwrap
        (a method, so a subclass can change the line every run gets)."""
        return bwrap_command(self.bwrap, argv, *rest, **options)

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
        if self._kills.was_killed_early(eval_id):
            return RunResult.cancelled(eval_id)
        while (earlier := self.running.get(eval_id)) is not None:  # another may replace it too
            log.warning("sandbox.replaced", eval_id=eval_id)
            self.kill(eval_id, remember=False)
            await earlier.finished.wait()
        slot = self._slots.take()
        run = self.running[eval_id] = Run(eval_id, language.name)
        try:
            return await self._compile_and_run(run, slot, language, code, limits, stdin, args)
        finally:
            if self.running.get(eval_id) is run:
                del self.running[eval_id]
            run.finished.set()
            if run.lingering is not None:
                log.warning("sandbox.slot_held", eval_id=eval_id, slot=slot)
                self._slots.hold(slot, eval_id)
                run.lingering.add_done_callback(lambda _: self._free_slot(slot, eval_id))
            else:
                self._slots.release(slot)
                if self._forks is not None:
                    self._forks.after_run(slot)

    def _free_slot(self, slot: int, held_for: str) -> None:
        log.info("sandbox.slot_freed", eval_id=held_for, slot=slot)
        self._slots.release(slot)
        if self._forks is not None:
            self._forks.after_run(slot)

    @property
    def uids(self) -> list[int]:
        """The uid each slot's sandboxes run as."""
        return list(self._slots.uids)

    @property
    def held(self) -> dict[int, str]:
        """Slots kept out of use until processes that outlived their run's kill end."""
        return dict(self._slots.held)

    def start_fork_servers(self, language: Language, runs_per_server: int, default_limits: Limits) -> None:
        """Fork every run from a server per slot from now on, running `language` (Python) in
        the server's interpreter and any other language's command by exec (see
        `executor.fork_server`); each server is replaced after `runs_per_server` runs. Runs'
        inits are prepared ahead with `default_limits` (a run's own are set when it comes)."""

        def launch(argv: tuple[str, ...], files: list[tuple[int, str, str]]) -> list[str]:
            return fork_server_command(self.bwrap, argv, files)

        self._forks = ForkServers(
            self._spawner, self._slots, launch, self.seccomp, language, runs_per_server, default_limits
        )
        self._forks.fill()

    async def _compile_and_run(
        self,
        run: Run,
        slot: int,
        language: Language,
        code: str,
        limits: Limits,
        stdin: str | None,
        args: tuple[str, ...],
    ) -> RunResult:
        source = [(code.encode(), f"/sandbox/{language.file_name}", "0444")]
        if language.compile:
            key = self.compiled.key(language, code.encode())
            binary = self.compiled.get(key)
            if binary is None:
                # the compiler writes the binary to /tmp; a shell inside the sandbox then streams
                # it to stdout, which is where the run's sandbox gets it from
                argv = ("/bin/sh", "-c", '"$@" >&2 && cat ' + BINARY, "compile", *language.compile)
                step = Phase(source, None, limits.compile_memory_mb, limits.compile_timeout, None, argv)
                built = await self._phase(run, slot, step, limits, compile_step=True)
                if run.cancelled or built.exit_code != 0 or built.timed_out or built.flooded:
                    return verdict(run, built, limits, self.enforced_by, compile_step=True)
                binary = bytes(built.stdout.data)
                self.compiled.put(key, binary)
            source = [(binary, RUN_BINARY, "0555")]
        in_process = self._forks is not None and self._forks.serves(language)
        argv = None if in_process else (*language.run, *args)
        phase = Phase(source, stdin, limits.memory_mb, limits.timeout, language, argv, args)
        outcome = await self._phase(run, slot, phase, limits)
        return verdict(run, outcome, limits, self.enforced_by)

    async def _phase(
        self, run: Run, slot: int, phase: Phase, limits: Limits, compile_step: bool = False
    ) -> Outcome:
        """One sandboxed process, from its start to reaped, with its usage: forked from the
        slot's fork server where it has one ready, else started cold."""
        if compile_step:
            deadlines = Deadlines(limits.compile_timeout, limits.compile_timeout)
            caps = (MAX_BINARY_BYTES, limits.output_bytes)
        else:
            deadlines = Deadlines(limits.wall_timeout, limits.timeout)
            caps = (limits.output_bytes, limits.output_bytes)
        if self._forks is not None:
            try:
                forked = await self._forks.start(slot, phase, limits)
            except SandboxError as exc:  # the server failed before the program ran
                log.warning("sandbox.fork_failed", eval_id=run.eval_id, slot=slot, error=str(exc))
                self._forks.retire(slot)
                forked = None
            if forked is not None:
                try:
                    return await supervise(run, forked, deadlines, caps, self._kills)
                except ForkServerGone:
                    raise  # gone mid-run: the program may have run, so not again here (a retry may)
                except SandboxError as exc:  # its set-up failed: the program never ran
                    log.warning("sandbox.fork_failed", eval_id=run.eval_id, slot=slot, error=str(exc))
                    self._forks.retire(slot)
        argv = phase.exec_argv or (*phase.language.run, *phase.args)  # type: ignore[union-attr]
        uid = self._slots.uids[slot]
        started = self._spawner.start(
            uid, argv, phase.files, phase.stdin, limits, phase.memory_mb, phase.cpu_s, phase.language
        )
        return await supervise(run, started, deadlines, caps, self._kills)

    def kill(self, eval_id: str, remember: bool = True) -> bool:
        """Stop a run now; its result comes back as `cancelled`.

        False if no such run. With `remember`, a request for it in the next minutes is then
        refused, so a cancel racing the run's start still wins; a worker abandoning only its
        own attempt (shutting down) does not remember, so the next delivery can run.
        """
        run = self.running.get(eval_id)
        if run is None:
            if remember:
                self._kills.remember(eval_id)
            return False
        run.cancelled = True
        run.kill()
        return True

    async def shutdown(self) -> None:
        """Kill every run and every fork server, so none outlives the executor."""
        for run in list(self.running.values()):
            run.kill()
        if self._forks is not None:
            self._forks.close()

    @property
    def fork_servers(self) -> int:
        """Fork servers ready for a run."""
        return len(self._forks) if self._forks else 0
