"""Run slots: how many runs one executor takes at once, and the uid each slot's sandboxes run as.

With a uid per slot (when the executor is root), limits counted per uid hold and runs cannot
touch each other.
"""

from __future__ import annotations

import asyncio
import os

from executor.errors import SandboxBusy


class Slots:
    """A fixed number of slots; a run takes a free one or is refused at once."""

    def __init__(self, uid_base: int, count: int, as_root: bool) -> None:
        #: the uid each run slot's sandboxes run as
        self.uids = [uid_base + slot if as_root else os.geteuid() for slot in range(count)]
        self.capacity = count
        self._free: asyncio.Queue[int] = asyncio.Queue()
        for slot in range(count):
            self._free.put_nowait(slot)
        #: slots whose last run's processes outlived their kill, with the run they wait for
        self.held: dict[int, str] = {}

    def take(self) -> int:
        """A free slot, now busy; `SandboxBusy` rather than queue work nobody may wait for."""
        if self._free.empty():
            raise SandboxBusy(self.capacity)
        return self._free.get_nowait()

    def release(self, slot: int) -> None:
        self.held.pop(slot, None)
        self._free.put_nowait(slot)

    def hold(self, slot: int, eval_id: str) -> None:
        """Keep a busy slot out of use (its uid still has live processes) until `release`."""
        self.held[slot] = eval_id
