"""The verdict: how a run ended, turned into the answer `/execute` gives."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from executor.limits import OUTPUT_KILL_FACTOR, Limits
from executor.outcome import Outcome
from executor.runs import Run

#: Messages runtimes print when an allocation fails. RLIMIT_AS refuses an allocation past it
#: before any cgroup sees it and leaves no other trace, so a failed run saying so counts as out of
#: memory even with cgroups (a program could print one: it only mislabels its own failure).
OUT_OF_MEMORY_SIGNS = (
    "MemoryError",
    "Cannot allocate memory",
    "std::bad_alloc",
    "out of memory",
    "Array buffer allocation failed",  # Node
    # a JVM whose heap (-Xmx, under the run's limit) or metaspace is full (ExitOnOutOfMemoryError's
    # words: a thread the process limit refused is an OutOfMemoryError too, but not this)
    "Terminating due to java.lang.OutOfMemoryError",
    "memory allocation of ",  # Rust's allocation failure ("... of N bytes failed"), then abort
)


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
    #: wall-clock time of the run, fractional (a warm run often takes under a millisecond)
    runtime_ms: float
    #: CPU time of the run's processes, including the runtime's start (an interpreter's imports)
    cpu_ms: int = 0
    peak_memory_kb: int = 0
    timed_out: bool = False
    limits_enforced_by: str = "rlimit"
    #: which limit ended a run that timed out: "cpu" (its CPU time) or "wall" (waiting)
    time_limit: str | None = None

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def cancelled(cls, eval_id: str) -> RunResult:
        """The answer for a run that was cancelled before it could start."""
        return cls(eval_id, "cancelled", None, None, "", "cancelled before it started", False, False, 0)


def verdict(run: Run, o: Outcome, limits: Limits, enforced_by: str, compile_step: bool = False) -> RunResult:
    """The run's status (first match: cancelled, timeout, output flood, memory, exit code)."""
    error = o.stderr.text()
    # a cgroup OOM kill, or an allocation the address-space limit refused (one too large
    # for it, even if far below the cgroup's limit in use so far)
    out_of_memory = o.oom_killed or (
        o.exit_code not in (0, None) and any(sign in error for sign in OUT_OF_MEMORY_SIGNS)
    )
    said = ""
    if run.cancelled:
        status = "cancelled"
    elif o.timed_out:
        status = "timeout"
        said = _time_limit(o, limits, compile_step)
    elif o.flooded:
        status = "output_limit_exceeded"
        said = f"Output limit exceeded: more than {OUTPUT_KILL_FACTOR} x {limits.output_bytes} bytes"
    elif out_of_memory:
        status = "memory_limit_exceeded"
        memory_mb = limits.compile_memory_mb if compile_step else limits.memory_mb
        said = f"Memory limit of {memory_mb} MB exceeded"
    elif o.exit_code == 0:
        status = "completed"
    else:
        status = "compile_error" if compile_step else "failed"
    if said:  # after what the program wrote, on a line of its own
        error = error.rstrip("\n") + "\n" + said if error.strip() else said
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
        limits_enforced_by=enforced_by,
        time_limit=("cpu" if o.cpu_limited else "wall") if o.timed_out and not compile_step else None,
    )


def _time_limit(o: Outcome, limits: Limits, compile_step: bool) -> str:
    """Which time limit ended the run: its CPU time, or its wall-clock time (waiting)."""
    if compile_step:
        return f"Time limit of {limits.compile_timeout:g}s exceeded (compiling)"
    if o.cpu_limited:
        return f"CPU time limit of {limits.timeout:g}s exceeded"
    return (
        f"Wall-clock time limit of {limits.wall_timeout:g}s exceeded "
        f"(CPU time used: {o.cpu_ms / 1000:.1f} of {limits.timeout:g}s; the rest was waiting)"
    )
