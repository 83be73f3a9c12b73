"""What a run may use: the limits a request sets (within the executor's maxima) and the fixed
ones every run shares. Kept apart so every part of the sandbox can read them without importing
the rest of it."""

from __future__ import annotations

from dataclasses import dataclass

from evaluations.languages import COMPILE_TIMEOUT_SECONDS, wall_limit

#: Output past this many times the kept size kills the run (`output_limit_exceeded`).
OUTPUT_KILL_FACTOR = 16


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
    #: the wall-clock limit a request gave (`wall_timeout`), else a multiple of `timeout`
    wall_s: float | None = None
    #: where the program starts: /tmp (writable), or /sandbox (read-only: its files beside the
    #: main one) for a submission that brought files
    workdir: str = "/tmp"

    @property
    def wall_timeout(self) -> float:
        """`timeout` limits CPU time; wall-clock time gets what the request said, else a multiple."""
        return self.wall_s or wall_limit(self.timeout)
