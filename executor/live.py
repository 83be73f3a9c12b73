"""A streamed run's live output: what its program writes, in chunks as it is read, for
`/execute`'s streamed answer (bounded as `evaluations.live_output` says).

Supervision hands `write` the bytes of stdout and stderr it keeps for the result (nothing past
the cap); the chunks are gathered here, on a timer of the event loop, and `batches()` yields
them until the run has ended.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from evaluations.live_output import Chunk, Coalescer


class LiveRun:
    """One streamed run's chunks, from its program's start to `end()`."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._coalescer = Coalescer()
        self._ready: list[Chunk] = []
        self._changed = asyncio.Event()
        self._timer: asyncio.TimerHandle | None = None
        #: done when the run has its slot (a run refused before, busy, is answered unstreamed)
        self.started: asyncio.Future[None] = self._loop.create_future()
        self.ended = False
        #: the run's result, once `end` was given it
        self.answer: dict[str, Any] | None = None

    def start(self) -> None:
        if not self.started.done():
            self.started.set_result(None)

    def write(self, kind: str, data: bytes, cut: bool) -> None:
        """Bytes of one stream kept for the result; `cut`: the program wrote past the cap."""
        if self.ended:  # a lingering run's pipes, read after its answer
            return
        self._give(self._coalescer.add(kind, data, cut, self._loop.time()))
        due = self._coalescer.due
        if due is not None and self._timer is None:
            self._timer = self._loop.call_at(due, self._flush)

    def end(self, answer: dict[str, Any] | None = None) -> None:
        """The run is over: what still waits goes, and nothing after. `answer`: its result, as
        `/execute` answers it, given as soon as it is known (before its slot is seen to)."""
        if self.ended:
            return
        self.ended = True
        self.answer = answer
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._give(self._coalescer.end())
        self._changed.set()

    async def batches(self) -> AsyncIterator[tuple[list[Chunk], bool]]:
        """The chunks ready since the last batch, as they come, each with whether the run has
        ended (the last batch): what comes together is sent together."""
        while True:
            await self._changed.wait()
            self._changed.clear()
            ready, self._ready = self._ready, []
            ended = self.ended  # (it may end while this batch is sent: then one more comes)
            yield ready, ended
            if ended:
                return

    def _flush(self) -> None:
        self._timer = None
        self._give(self._coalescer.flush())

    def _give(self, chunks: list[Chunk]) -> None:
        if chunks:
            self._ready += chunks
            self._changed.set()
