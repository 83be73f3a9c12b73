"""The warm pool: one warm sandbox (see `executor.warm`) started ahead per free run slot, and
the handover of a run's code to it.

A warm sandbox that cannot take its run (gone, or its loader failed) is discarded and the run
starts cold, so nothing of ours is ever reported as the submission's failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from dataclasses import dataclass

import structlog

from evaluations.languages import Language
from executor.errors import SandboxError
from executor.limits import Limits
from executor.slots import Slots
from executor.spawn import Spawner, Started
from executor.warm import WarmSpec

log = structlog.get_logger(__name__)


@dataclass
class Warm:
    """A pre-started Python sandbox waiting for its code on `code_write`."""

    started: Started
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


class WarmPool:
    """Warm sandboxes by slot, each started in its slot's uid and used for one run."""

    def __init__(self, spawner: Spawner, slots: Slots) -> None:
        self._spawner = spawner
        self._slots = slots
        #: set by `fill`: what the warm sandboxes are started for (None: none are)
        self.spec: WarmSpec | None = None
        self._ready: dict[int, Warm] = {}

    def __len__(self) -> int:
        return len(self._ready)

    def fill(self, spec: WarmSpec) -> None:
        """Keep a pre-started sandbox for `spec` in every free slot from now on."""
        self.spec = spec
        for slot in range(self._slots.capacity):
            self.refill(slot)

    def refill(self, slot: int) -> None:
        """Start a warm sandbox for a free slot (one taken meanwhile starts its run cold)."""
        if self.spec is None or slot in self._ready or self._slots.is_busy(slot):
            return
        try:
            self._ready[slot] = self._prewarm(self._slots.uids[slot], self.spec)
        except (OSError, SandboxError) as exc:
            log.warning("sandbox.prewarm_failed", error=str(exc))

    def _prewarm(self, uid: int, spec: WarmSpec) -> Warm:
        code_read, code_write = os.pipe()
        try:
            limits = spec.limits
            started = self._spawner.start(uid, spec.argv(code_read), [], None, limits, limits.memory_mb,
                                          limits.timeout, spec.language, keep_fds=(code_read,))  # fmt: skip
        except BaseException:
            os.close(code_write)
            raise
        finally:
            os.close(code_read)
        return Warm(started, code_write)

    def take(
        self, slot: int, language: Language, limits: Limits, stdin: str | None, args: tuple[str, ...]
    ) -> Warm | None:
        """The slot's warm sandbox if this run can use it; one it cannot use is discarded."""
        warm = self._ready.pop(slot, None)
        if warm and self.spec and self.spec.serves(language, limits, stdin, args):
            return warm
        if warm:
            warm.discard()
        return None

    def close(self) -> None:
        """Discard every warm sandbox and start no more, so none outlives the executor."""
        self.spec = None
        while self._ready:
            self._ready.popitem()[1].discard()


async def hand_over(warm: Warm, code: str, eval_id: str) -> bool:
    """Hand the code to a warm sandbox, which from then on is supervised as a cold run is.

    False if it is gone (it died waiting, or its loader failed): the run then starts cold.
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
        log.warning("sandbox.warm_lost", eval_id=eval_id, error=str(exc))
        return False
    return True


def _write_and_close(fd: int, data: bytes) -> None:
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)
