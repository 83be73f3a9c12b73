"""How one sandboxed process ended: what supervision records and the verdict reads.

Output is kept up to a cap and the rest only counted, so a flood costs no memory.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

READ_CHUNK = 65536


@dataclass
class Capture:
    """Bytes of one stream, up to a cap; the rest is counted and dropped."""

    cap: int
    on_flood: Callable[[], None]
    flood_at: int
    data: bytearray = field(default_factory=bytearray)
    seen: int = 0
    #: a streamed run's: handed the bytes kept as they are read, and whether the stream was cut
    #: at the cap (told once, with the last bytes kept)
    live: Callable[[bytes, bool], None] | None = None

    @property
    def truncated(self) -> bool:
        return self.seen > self.cap

    async def drain(self, stream: asyncio.StreamReader) -> None:
        while chunk := await stream.read(READ_CHUNK):
            room = self.cap - len(self.data)
            kept = chunk[:room] if room > 0 else b""
            self.data += kept
            was_cut = self.truncated
            self.seen += len(chunk)
            if self.live is not None and (kept or self.truncated != was_cut):
                self.live(kept, self.truncated)
            if self.seen > self.flood_at:
                self.on_flood()

    def text(self) -> str:
        return self.data.decode("utf-8", errors="replace")


@dataclass
class Outcome:
    """How one sandboxed process ended."""

    exit_code: int | None
    signal: int | None
    stdout: Capture
    stderr: Capture
    #: wall-clock time from the program's start to its end, to the hundredth of a millisecond
    wall_ms: float
    #: CPU time (user + system) of every process of the run, from its start in the sandbox
    cpu_ms: int
    peak_rss_kb: int
    timed_out: bool
    flooded: bool
    oom_killed: bool = False
    #: the time-out was the CPU-time limit's (else, with `timed_out`, the wall-clock limit's)
    cpu_limited: bool = False
