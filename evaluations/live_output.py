"""Live output: what a run writes, in chunks, to whoever follows its evaluation while it runs
(the `output` and `error` events of `GET /api/eval/{id}/events`), bounded in rate and size.

The executor keeps the first `output_bytes` of a run's stdout and of its stderr (the stored
`output` and `error`); exactly those bytes, as they are read, go to a `Coalescer`, which
gathers them into chunks: each stream's waiting bytes go at most `FLUSH_S` after the first of
them came, or at once when `FLUSH_BYTES` wait. So a stream sends at most about 1 / `FLUSH_S`
chunks a second beside one per `FLUSH_BYTES`, never more than the stored cap in all, and its
last chunk says `truncated` when the program wrote past the cap. The text of a stream's chunks,
joined, is the stored text (decoded alike, a character split between chunks kept whole).

Nothing here is stored: the worker publishes each chunk on the evaluation's event channel
(`RedisKeys.events_of`) and the recorded timeline and result stay as they were.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass, field
from typing import Any

#: The kinds of live chunk: the program's stdout, and its stderr (the result's field names).
KINDS = ("output", "error")
#: A stream's waiting bytes go at most this long after the first of them came...
FLUSH_S = 0.1
#: ...or at once when this many wait.
FLUSH_BYTES = 4096


@dataclass(frozen=True)
class Chunk:
    """Text one stream of a run wrote, in order; `truncated`: the stream's last, cut at the cap."""

    kind: str
    data: str
    truncated: bool = False

    def to_dict(self) -> dict[str, Any]:
        shown: dict[str, Any] = {"type": self.kind, "data": self.data}
        if self.truncated:
            shown["truncated"] = True
        return shown


@dataclass
class _Stream:
    waiting: bytearray = field(default_factory=bytearray)
    #: when the first waiting byte came (None: nothing waits)
    since: float | None = None
    decoder: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace")
    )
    #: the program wrote past the cap: nothing more comes
    cut: bool = False
    ended: bool = False


class Coalescer:
    """Gathers the bytes each stream of a run gives into chunks (see the module). Pure: the
    caller gives the time and sends what `add`, `flush` and `end` return."""

    def __init__(self, flush_bytes: int = FLUSH_BYTES, flush_s: float = FLUSH_S) -> None:
        self.flush_bytes = flush_bytes
        self.flush_s = flush_s
        self._streams = {kind: _Stream() for kind in KINDS}

    def add(self, kind: str, data: bytes, cut: bool, now: float) -> list[Chunk]:
        """Bytes `kind`'s stream gave (`cut`: the program wrote past the cap, and these are the
        last); the chunks ready now."""
        stream = self._streams[kind]
        if stream.ended:
            return []
        if data and stream.since is None:
            stream.since = now
        stream.waiting += data
        stream.cut = stream.cut or cut
        if len(stream.waiting) >= self.flush_bytes or stream.cut:
            return self._flush(kind, stream)
        return []

    @property
    def due(self) -> float | None:
        """When waiting bytes must go (`flush`), or None when nothing waits."""
        times = [s.since for s in self._streams.values() if s.since is not None]
        return min(times) + self.flush_s if times else None

    def flush(self) -> list[Chunk]:
        """Every waiting chunk, now."""
        return [c for kind, s in self._streams.items() if not s.ended for c in self._flush(kind, s)]

    def end(self) -> list[Chunk]:
        """The run has ended: what still waits, a character left incomplete decoded as the
        stored text decodes it; nothing is taken after."""
        chunks = []
        for kind, stream in self._streams.items():
            if stream.ended:
                continue
            chunks += self._flush(kind, stream, final=True)
            stream.ended = True
        return chunks

    def _flush(self, kind: str, stream: _Stream, final: bool = False) -> list[Chunk]:
        final = final or stream.cut
        text = stream.decoder.decode(bytes(stream.waiting), final=final)
        stream.waiting.clear()
        stream.since = None
        if stream.cut:
            stream.ended = True
            return [Chunk(kind, text, truncated=True)]
        return [Chunk(kind, text)] if text else []


def live_event(eval_id: str, chunk: dict[str, Any], seq: int, at_ms: int) -> dict[str, Any]:
    """A chunk as published on the evaluation's event channel: `type` is its kind (a status
    change has no `type`), `seq` counts the attempt's chunks from 1."""
    return {"eval_id": eval_id, **chunk, "seq": seq, "at_ms": at_ms}


def is_live(event: dict[str, Any]) -> bool:
    """Whether an event of the channel is a live chunk (else a status change)."""
    return event.get("type") in KINDS
