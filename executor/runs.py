"""Runs in progress, and kills that arrived before their run did.

A run is killed through its process group; a kill for a run not (yet) here is remembered for a
while, so a cancel racing the run's start still wins.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from executor.live import LiveRun
from executor.program import Program

#: How long a kill for a run not (yet) here makes this executor refuse to start that run.
KILL_MEMORY_SECONDS = 300.0


@dataclass
class Run:
    """One run in progress: what `/running` lists and what a kill stops."""

    eval_id: str
    language: str
    started_at: float = field(default_factory=time.time)
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: bool = False
    #: the started sandbox while it runs (what a kill stops)
    program: Program | None = None
    #: set when the run was answered while processes of it were still alive after their kill
    #: (uninterruptible sleep holding its pipes): done once they have ended, and until then its
    #: slot, uid and cgroup stay out of use
    lingering: asyncio.Future[object] | None = None
    #: a streamed run's live output (its program's, not a compile step's or a checker's)
    live: LiveRun | None = None

    @property
    def pid(self) -> int | None:
        return self.program.pid if self.program else None

    def kill(self) -> None:
        if self.program is not None:
            self.program.kill()
            if self.program.group is not None:  # every process at once, where cgroups can
                self.program.group.kill()


class KillMemory:
    """Kills of runs that were not running, each kept for `KILL_MEMORY_SECONDS`."""

    def __init__(self) -> None:
        self._killed_early: dict[str, float] = {}

    def remember(self, eval_id: str) -> None:
        self._killed_early[eval_id] = time.monotonic()

    def was_killed_early(self, eval_id: str) -> bool:
        """Whether a kill for `eval_id` is remembered; it is forgotten once asked for."""
        horizon = time.monotonic() - KILL_MEMORY_SECONDS
        for stale in [k for k, at in self._killed_early.items() if at < horizon]:
            del self._killed_early[stale]
        return self._killed_early.pop(eval_id, None) is not None
