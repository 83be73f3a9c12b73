"""Supervising a started sandbox to its end: its output read with caps, its wall time enforced,
its killing when either runs out, then its reaping with the usage it and its cgroups report.

stdout and stderr are read as they come: the first `output_bytes` are kept (the rest dropped
and the result flagged truncated); past `OUTPUT_KILL_FACTOR` times that the run is killed
with `output_limit_exceeded`, so a flood costs neither memory nor the whole time limit. A
streamed run's kept bytes also go, as they are read, to its `LiveRun`. A wall-clock time-out
kills bwrap, and with it the whole pid namespace.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import time
from dataclasses import dataclass

from evaluations.live_output import KINDS
from executor.cgroups import RunGroup
from executor.errors import SandboxError
from executor.limits import OUTPUT_KILL_FACTOR
from executor.live import LiveRun
from executor.outcome import READ_CHUNK, Capture, Outcome
from executor.program import Program
from executor.runs import KillMemory, Run

#: Exit statuses bwrap reports for a program killed by a signal (128 + signal number).
SIGNAL_EXIT_BASE = 128
#: A SIGXCPU exit (or a wall-clock time-out) is the CPU limit's if at least this share of it
#: was used.
CPU_LIMIT_SHARE = 0.9
#: How often a run's CPU time is read from its cgroup: RLIMIT_CPU counts each process apart,
#: and a run's processes together are limited, so the run's total is watched here.
CPU_POLL_S = 0.1


@dataclass(frozen=True)
class Deadlines:
    """A run's wall-clock limit and its CPU-time limit (seconds)."""

    wall_s: float
    cpu_s: float


#: How long a killed run's processes may take to end before the run is answered anyway. One
#: stuck in uninterruptible sleep (waiting on the disk) holds its pipes and cannot be reaped:
#: its verdict must not wait for it (its slot does, see `Run.lingering`).
KILL_GRACE_S = 2.0


async def supervise(
    run: Run,
    started: Program,
    deadlines: Deadlines,
    caps: tuple[int, int],
    kills: KillMemory,
    live: LiveRun | None = None,
) -> Outcome:
    """Supervise a started sandbox to its end; read its usage and undo its cgroups. `live`
    (a streamed run's) is handed the output kept as it is read."""
    group = started.group
    watchdog: asyncio.Task[bool] | None = None
    try:
        run.program = started
        # a kill that came while the process was spawned (or forked)
        if run.cancelled or kills.was_killed_early(run.eval_id):
            run.cancelled = True
            run.kill()
        if group:
            watchdog = asyncio.create_task(_watch_cpu(run, group, deadlines.cpu_s))
        outcome = await _watch(run, started, deadlines.wall_s, caps, live)
        if watchdog and await _stop(watchdog):
            outcome.timed_out = outcome.cpu_limited = True
    finally:
        if watchdog and not watchdog.done():  # `_watch` raised: the watchdog is stopped here
            watchdog.cancel()
        run.program = None
        ran = started.finish()
        stats = group.stats() if group else None
        if group and run.lingering is not None:  # a cgroup with live processes cannot go yet
            run.lingering.add_done_callback(lambda _: group.remove())
        elif group:
            group.remove()
    if stats:
        outcome.peak_rss_kb = max(outcome.peak_rss_kb, stats.peak_memory_bytes // 1024)
        outcome.oom_killed = stats.oom_killed
        outcome.cpu_ms = max(outcome.cpu_ms, stats.cpu_ns // 1_000_000)
    # the program never ran unless the sandbox says so, or we ourselves killed it first
    we_stopped_it = run.cancelled or outcome.timed_out or outcome.flooded or outcome.oom_killed
    if not ran and not we_stopped_it:
        raise SandboxError(f"the sandbox did not start the program: {outcome.stderr.text()[:500]}")
    # bwrap reports a signal as 128 + N, which a program can also exit with: SIGXCPU only
    # counts as the CPU limit when the CPU time was really spent
    spent_cpu_limit = outcome.cpu_ms >= CPU_LIMIT_SHARE * deadlines.cpu_s * 1000
    if spent_cpu_limit and (outcome.signal == signal.SIGXCPU or outcome.timed_out):
        outcome.timed_out = outcome.cpu_limited = True
    return outcome


async def _watch_cpu(run: Run, group: RunGroup, cpu_s: float) -> bool:
    """Kill the run once all its processes together used `cpu_s` of CPU; True if it did."""
    limit_ns = cpu_s * 1e9
    while True:
        await asyncio.sleep(CPU_POLL_S)
        try:
            used = group.cpu_ns()
        except OSError:
            return False
        if used >= limit_ns:
            run.kill()
            return True


async def _stop(task: asyncio.Task[bool]) -> bool:
    """Whether the watchdog fired; it is stopped if it still runs."""
    if not task.done():
        task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        return await task
    return False


def _ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 2)


async def _watch(
    run: Run, program: Program, timeout: float, caps: tuple[int, int], live: LiveRun | None = None
) -> Outcome:
    """Read both streams (each up to its cap), enforce the wall time, reap with resource usage."""
    loop = asyncio.get_running_loop()
    flooded = False

    def flood() -> None:
        nonlocal flooded
        flooded = True
        run.kill()

    feeds = [functools.partial(live.write, kind) if live else None for kind in KINDS]
    out, err = (Capture(caps[i], flood, caps[i] * OUTPUT_KILL_FACTOR, live=feeds[i]) for i in (0, 1))
    started = time.perf_counter()
    readers = [await _reader(loop, pipe) for pipe in (program.stdout, program.stderr)]
    io = asyncio.gather(out.drain(readers[0]), err.drain(readers[1]), program.wait())
    timed_out = False
    try:
        await asyncio.wait_for(asyncio.shield(io), timeout=timeout)
    except TimeoutError:
        timed_out = True
        run.kill()
        if not await _ends_within(io, KILL_GRACE_S):
            run.lingering = io
            io.add_done_callback(_retrieve)
            return Outcome(exit_code=None, signal=signal.SIGKILL, stdout=out, stderr=err,
                           wall_ms=_ms_since(started), cpu_ms=0,
                           peak_rss_kb=0, timed_out=True, flooded=False)  # fmt: skip
    except BaseException:
        run.kill()
        await asyncio.gather(io, return_exceptions=True)
        raise
    wall_ms = _ms_since(started)
    _, _, (status, usage) = io.result()
    code = os.waitstatus_to_exitcode(status)
    sig = -code if code < 0 else (code - SIGNAL_EXIT_BASE if code > SIGNAL_EXIT_BASE else None)
    return Outcome(
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


async def _ends_within(future: asyncio.Future[object], seconds: float) -> bool:
    done, _ = await asyncio.wait({future}, timeout=seconds)
    return bool(done)


def _retrieve(future: asyncio.Future[object]) -> None:
    """Consume a lingering run's end, so a failure of it is not reported as never retrieved."""
    if not future.cancelled():
        future.exception()


async def _reader(loop: asyncio.AbstractEventLoop, pipe: object) -> asyncio.StreamReader:
    reader = asyncio.StreamReader(limit=READ_CHUNK * 4)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), pipe)
    return reader
