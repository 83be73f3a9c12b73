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

import dataclasses
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import structlog

from evaluations.languages import BINARY, RUN_BINARY, Language
from evaluations.submission_spec import Case, RunSpec, SourceFile
from executor import cases
from executor.bwrap_command import bwrap_command, fork_server_command
from executor.cgroups import Cgroups, Enforcement
from executor.checkers import check
from executor.compile_cache import CompileCache
from executor.errors import SandboxError
from executor.fork_server import ForkServerGone, ForkServers, Phase
from executor.limits import Limits
from executor.live import LiveRun
from executor.outcome import Outcome
from executor.runs import KillMemory, Run
from executor.slots import Slots
from executor.spawn import Spawner
from executor.supervise import Deadlines, supervise
from executor.verdict import RunResult, verdict

log = structlog.get_logger(__name__)

#: Largest compiled binary handed from the compile sandbox to the run sandbox.
MAX_BINARY_BYTES = 64 * 1024 * 1024

T = TypeVar("T")


@dataclass
class Built:
    """A program ready to run: what its sandbox gets in /sandbox, or the compile step's
    failure; `info` tells of the compile step (a compiled language only)."""

    source: list[tuple[bytes, str, str]]
    failed: RunResult | None = None
    info: dict[str, Any] | None = field(default=None)


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
        files: tuple[SourceFile, ...] = (),
        live: LiveRun | None = None,
    ) -> RunResult:
        """Compile if the language needs it, run, and return the verdict. `files` are laid out
        read-only beside the main file. `live` is told when the run has its slot, gets the
        program's output as it is read (not a compile step's), and the answer as soon as it is
        known.

        A run cancelled before it arrived is not started. A second request for a run still in
        progress replaces it: its worker has given up on it (died, or was stopped). With every
        slot taken it raises `SandboxBusy` at once rather than queue work nobody may wait for.
        """

        async def in_slot(run: Run, slot: int) -> RunResult:
            if live is not None:
                run.live = live
                live.start()
            built = await self._build(run, slot, language, code, files, limits)
            source = built.source
            result = built.failed or await self._execute(run, slot, language, source, limits, stdin, args)
            if live is not None:  # its answer goes before the slot is seen to (`after_run`)
                live.end(result.to_dict())
            return result

        return await self._in_slot(eval_id, language, in_slot, lambda: RunResult.cancelled(eval_id))

    async def run_cases(
        self, eval_id: str, language: Language, spec: RunSpec, limits: Limits, checker: Language | None = None
    ) -> dict[str, Any]:
        """Compile once, then run every case of `spec` in a fresh sandbox of its own (a fresh
        fork: nothing a case wrote is there for the next) and check its output, by `spec`'s
        checker or by running the custom checker's program (`checker`, its language) in a
        sandbox of its own; `/execute`'s answer with each case's result and the verdict."""

        async def in_slot(run: Run, slot: int) -> dict[str, Any]:
            built = await self._build(run, slot, language, spec.code, spec.files, limits)
            if built.failed is not None:
                return cases.compile_failed(eval_id, spec, built.failed, built.info or {})
            judge = None
            if spec.checker.custom is not None and checker is not None:
                judge = await self._build(run, slot, checker, spec.checker.custom.code, (), limits)
                if judge.failed is not None:
                    return cases.compile_failed(eval_id, spec, judge.failed, built.info or {}, checker=True)
            judged: list[cases.Judged] = []
            for case in spec.tests:
                if run.cancelled or run.lingering is not None:
                    break  # a case whose processes outlived their kill holds the slot's uid
                if judged and spec.stop_on_first_failure and judged[-1].status != "accepted":
                    break
                own = cases.case_limits(limits, spec, case)
                result = await self._execute(run, slot, language, built.source, own, case.stdin, case.args)
                if self._forks is not None and judge is None:  # the next case's init, made meanwhile
                    self._forks.prepare_next(slot)
                judged.append(await self._check(run, slot, spec, case, result, checker, judge, limits))
            return cases.answer(eval_id, spec, judged, built.info, self.enforced_by, run.cancelled)

        def cancelled() -> dict[str, Any]:
            return cases.answer(eval_id, spec, [], None, self.enforced_by, cancelled=True)

        return await self._in_slot(eval_id, language, in_slot, cancelled)

    async def _in_slot(
        self,
        eval_id: str,
        language: Language,
        work: Callable[[Run, int], Awaitable[T]],
        cancelled: Callable[[], T],
    ) -> T:
        """`work` on a slot of its own, as the run of `eval_id` (what a kill stops)."""
        if self._kills.was_killed_early(eval_id):
            return cancelled()
        while (earlier := self.running.get(eval_id)) is not None:  # another may replace it too
            log.warning("sandbox.replaced", eval_id=eval_id)
            self.kill(eval_id, remember=False)
            await earlier.finished.wait()
        slot = self._slots.take()
        run = self.running[eval_id] = Run(eval_id, language.name)
        try:
            return await work(run, slot)
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

    async def _build(
        self,
        run: Run,
        slot: int,
        language: Language,
        code: str,
        files: tuple[SourceFile, ...],
        limits: Limits,
    ) -> Built:
        """What a run's sandbox gets in /sandbox: the source (or, for a compiled language, the
        binary: compiled here, or found in the compile cache) and the submission's files."""
        source = [(code.encode(), f"/sandbox/{language.file_name}", "0444")]
        beside = [(f.content, f"/sandbox/{f.name}", "0444") for f in files]
        if not language.compile:
            return Built(source + beside)
        key = self.compiled.key(language, code.encode(), [(f.name, f.content) for f in files])
        binary = self.compiled.get(key)
        info: dict[str, Any] = {"status": "completed", "cached": binary is not None}
        if binary is None:
            # the compiler writes the binary to /tmp; a shell inside the sandbox then streams
            # it to stdout, which is where the run's sandbox gets it from
            compiler = language.compile_argv(limits.compile_memory_mb)
            argv = ("/bin/sh", "-c", '"$@" >&2 && cat ' + BINARY, "compile", *compiler)
            step = Phase(
                source + beside, None, limits.compile_memory_mb, limits.compile_timeout, language, argv
            )
            built = await self._phase(run, slot, step, limits, compile_step=True)
            info.update(runtime_ms=built.wall_ms, cpu_ms=built.cpu_ms)
            if run.cancelled or built.exit_code != 0 or built.timed_out or built.flooded:
                failed = verdict(run, built, limits, self.enforced_by, compile_step=True)
                info.update(status=failed.status, error=failed.error[: cases.CASE_OUTPUT_BYTES])
                return Built([], failed, info)
            binary = bytes(built.stdout.data)
            self.compiled.put(key, binary)
        return Built([(binary, RUN_BINARY, "0555"), *beside], None, info)

    async def _execute(
        self,
        run: Run,
        slot: int,
        language: Language,
        source: list[tuple[bytes, str, str]],
        limits: Limits,
        stdin: str | None,
        args: tuple[str, ...],
    ) -> RunResult:
        """One run of a built program, and its verdict. With files beside the main one, it
        starts in /sandbox among them."""
        if len(source) > 1 and limits.workdir == "/tmp":
            limits = dataclasses.replace(limits, workdir="/sandbox")
        in_process = self._forks is not None and self._forks.serves(language)
        argv = None if in_process else (*language.run_argv(limits.memory_mb), *args)
        phase = Phase(source, stdin, limits.memory_mb, limits.timeout, language, argv, args)
        outcome = await self._phase(run, slot, phase, limits)
        return verdict(run, outcome, limits, self.enforced_by)

    async def _check(
        self,
        run: Run,
        slot: int,
        spec: RunSpec,
        case: Case,
        result: RunResult,
        checker: Language | None,
        judge: Built | None,
        limits: Limits,
    ) -> cases.Judged:
        """A case's result, checked: by the custom checker's program run in a sandbox of its
        own (with the input, output and expected output as files), else by the spec's checker
        where the case expects an output."""
        if result.status != "completed":
            return cases.Judged(case, result)
        if judge is None or checker is None:
            if case.expected_output is None:
                return cases.Judged(case, result)
            return cases.Judged(case, result, check(spec.checker, case.expected_output, result.output))
        given = (case.stdin or "", result.output, case.expected_output or "")
        paths = tuple(f"/sandbox/{name}" for name in cases.CHECKER_FILES)
        laid = [(text.encode(), path, "0444") for path, text in zip(paths, given, strict=True)]
        own = cases.checker_limits(limits)
        said = await self._execute(run, slot, checker, judge.source + laid, own, None, paths)
        checked, failed = cases.checker_verdict(said)
        return cases.Judged(case, result, checked, failed)

    async def _phase(
        self, run: Run, slot: int, phase: Phase, limits: Limits, compile_step: bool = False
    ) -> Outcome:
        """One sandboxed process, from its start to reaped, with its usage: forked from the
        slot's fork server where it has one ready, else started cold."""
        if compile_step:
            deadlines = Deadlines(limits.compile_timeout, limits.compile_timeout)
            caps = (MAX_BINARY_BYTES, limits.output_bytes)
            live = None
        else:
            deadlines = Deadlines(limits.wall_timeout, limits.timeout)
            caps = (limits.output_bytes, limits.output_bytes)
            live = run.live
        if self._forks is not None:
            try:
                forked = await self._forks.start(slot, phase, limits)
            except SandboxError as exc:  # the server failed before the program ran
                log.warning("sandbox.fork_failed", eval_id=run.eval_id, slot=slot, error=str(exc))
                self._forks.retire(slot)
                forked = None
            if forked is not None:
                try:
                    return await supervise(run, forked, deadlines, caps, self._kills, live)
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
        return await supervise(run, started, deadlines, caps, self._kills, live)

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
