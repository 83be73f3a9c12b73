"""What supervision needs of a started sandboxed program, however it was started: a cold bwrap
(`executor.spawn.Started`) or a fork of a slot's fork server (`executor.fork_server.Forked`)."""

from __future__ import annotations

from typing import IO, Protocol

from executor.cgroups import RunGroup


class Usage(Protocol):
    """The resource usage of a program and the descendants it reaped (as `wait4` reports)."""

    ru_utime: float
    ru_stime: float
    ru_maxrss: int


class Program(Protocol):
    """A started sandboxed program: its output pipes, its end, its kill."""

    group: RunGroup | None

    @property
    def stdout(self) -> IO[bytes]: ...

    @property
    def stderr(self) -> IO[bytes]: ...

    @property
    def pid(self) -> int | None:
        """The host pid of the sandbox's outermost process (None if unknown)."""

    def kill(self) -> None:
        """Kill the program and everything it started (its whole pid namespace)."""

    async def wait(self) -> tuple[int, Usage]:
        """Its end: a wait status (a signal N as exit 128 + N, as bwrap reports it) and usage."""

    def finish(self) -> bool:
        """Once it has ended: whether the program itself ran (else the sandbox's own set-up
        failed); releases what was kept to tell."""
