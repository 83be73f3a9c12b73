"""Live output's bounds: chunks gathered by time and size, nothing past the stored cap, the
text joined exactly the stored text; and the worker's publisher never failing its run."""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError

from actors.live_output import LivePublisher
from evaluations.live_output import FLUSH_BYTES, FLUSH_S, Chunk, Coalescer, is_live, live_event
from executor.live import LiveRun
from executor.outcome import Capture


def test_bytes_wait_until_their_time_is_due_then_go_together() -> None:
    c = Coalescer()
    assert c.due is None
    assert c.add("output", b"one\n", False, now=10.0) == []
    assert c.add("error", b"oops\n", False, now=10.05) == []
    assert c.add("output", b"two\n", False, now=10.08) == []
    assert c.due == 10.0 + FLUSH_S  # the oldest waiting byte's
    assert c.flush() == [Chunk("output", "one\ntwo\n"), Chunk("error", "oops\n")]
    assert c.due is None and c.flush() == []


def test_a_stream_with_enough_waiting_goes_at_once() -> None:
    c = Coalescer()
    assert c.add("output", b"x" * (FLUSH_BYTES - 1), False, now=0) == []
    assert c.add("output", b"y", False, now=0.01) == [Chunk("output", "x" * (FLUSH_BYTES - 1) + "y")]
    assert c.due is None


def test_the_cut_is_said_once_on_the_last_chunk_and_nothing_comes_after() -> None:
    c = Coalescer()
    c.add("output", b"kept", False, now=0)
    assert c.add("output", b" last", True, now=0.01) == [Chunk("output", "kept last", truncated=True)]
    assert c.add("output", b"more", False, now=0.02) == []
    assert c.add("error", b"err", False, now=0.02) == []
    assert c.flush() == [Chunk("error", "err")]
    assert c.end() == []
    assert Chunk("output", "", truncated=True).to_dict() == {"type": "output", "data": "", "truncated": True}
    assert Chunk("error", "e").to_dict() == {"type": "error", "data": "e"}


def test_joined_chunks_are_the_stored_text_however_the_bytes_were_split() -> None:
    rng = random.Random(7)
    alphabet = ["a", "\n", "é", "€", "😀"]
    for _ in range(200):
        data = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60))).encode()
        data += bytes(rng.randint(0, 255) for _ in range(rng.randint(0, 3)))  # invalid UTF-8 too
        cap = rng.randint(0, len(data) + 2)
        kept = data[:cap]
        c, chunks, at = Coalescer(flush_bytes=rng.randint(1, 16)), [], 0
        while at < len(kept):
            step = rng.randint(1, 7)
            last = at + step >= len(kept)
            chunks += c.add("output", kept[at : at + step], last and len(data) > cap, now=at)
            if rng.random() < 0.3:
                chunks += c.flush()
            at += step
        chunks += c.end()
        assert "".join(ch.data for ch in chunks) == kept.decode("utf-8", errors="replace")
        assert [ch.truncated for ch in chunks].count(True) == (1 if len(data) > cap and kept else 0)


async def captured(cap: int, *reads: bytes) -> tuple[Capture, list[tuple[bytes, bool]]]:
    """What a capture of `cap` bytes hands on, the stream given `reads` one by one."""
    given: list[tuple[bytes, bool]] = []
    capture = Capture(cap, lambda: None, 1000, live=lambda data, cut: given.append((data, cut)))
    for part in reads:
        reader = asyncio.StreamReader()
        reader.feed_data(part)
        reader.feed_eof()
        await capture.drain(reader)
    return capture, given


async def test_the_capture_hands_on_only_the_bytes_it_keeps_and_says_the_cut_once() -> None:
    capture, given = await captured(10, b"12345678", b"90abc", b"more")
    assert given == [(b"12345678", False), (b"90", True)] and bytes(capture.data) == b"1234567890"
    # exactly the cap, then past it: the cut comes with no bytes
    capture, given = await captured(10, b"1234567890", b"x")
    assert given == [(b"1234567890", False), (b"", True)] and capture.truncated
    capture, given = await captured(10, b"0123456789")
    assert given == [(b"0123456789", False)] and not capture.truncated


async def test_a_live_run_sends_its_chunks_on_time_and_ends_with_what_waits() -> None:
    live = LiveRun()
    got: list[tuple[float, Chunk]] = []
    loop = asyncio.get_running_loop()

    async def read() -> None:
        async for batch, ended in live.batches():
            got.extend((loop.time(), chunk) for chunk in batch)
            assert ended == live.ended

    reader = asyncio.create_task(read())
    began = loop.time()
    live.write("output", b"first\n", False)
    await asyncio.sleep(FLUSH_S * 3)
    assert [c for _, c in got] == [Chunk("output", "first\n")]
    assert FLUSH_S * 0.9 <= got[0][0] - began < FLUSH_S * 2.5
    live.write("error", b"late", False)
    live.end()
    live.write("output", b"after the end", False)
    await asyncio.wait_for(reader, 1)
    assert [c for _, c in got] == [Chunk("output", "first\n"), Chunk("error", "late")]


async def test_a_run_that_ends_while_a_batch_is_sent_still_sends_its_last() -> None:
    live = LiveRun()
    live.write("output", b"x" * FLUSH_BYTES, False)  # ready at once
    got = []
    async for batch, ended in live.batches():
        got.append((batch, ended))
        if not ended:  # while this batch is sent, the rest comes and the run ends
            live.write("output", b"tail", False)
            live.end({"status": "completed"})
            await asyncio.sleep(0)
    assert got == [([Chunk("output", "x" * FLUSH_BYTES)], False), ([Chunk("output", "tail")], True)]
    assert live.answer == {"status": "completed"} and live.started.done() is False


class FailingRedis:
    """A client whose publishes fail (Redis away)."""

    def __init__(self) -> None:
        self.calls = 0

    def pipeline(self, transaction: bool = True) -> Any:
        outer = self

        class Pipe:
            async def __aenter__(self) -> Pipe:
                return self

            async def __aexit__(self, *_: object) -> None:
                return None

            def publish(self, channel: str, event: str) -> None:
                outer.calls += 1

            async def execute(self) -> None:
                raise RedisConnectionError("Redis is away")

        return Pipe()


class SlowRedis(FailingRedis):
    """A client whose publishes never answer."""

    def pipeline(self, transaction: bool = True) -> Any:
        pipe = super().pipeline(transaction)

        async def hang() -> None:
            await asyncio.sleep(3600)

        pipe.execute = hang
        return pipe


async def test_a_publisher_whose_redis_fails_drops_its_chunks_and_returns_at_once() -> None:
    client = FailingRedis()
    live = LivePublisher(client, "ns:events:e", "e")  # type: ignore[arg-type]
    live.add({"type": "output", "data": "a"})
    live.add({"type": "output", "data": "b"})
    await asyncio.sleep(0.05)
    live.add({"type": "error", "data": "c"})  # after the failure: dropped without a try
    assert await asyncio.wait_for(live.finish(), 1) == []
    assert client.calls == 2 and live.dropped == 3 and live.seq == 2


async def test_a_publisher_waits_a_bounded_time_for_a_slow_redis() -> None:
    live = LivePublisher(SlowRedis(), "ns:events:e", "e")  # type: ignore[arg-type]
    live.add({"type": "output", "data": "a"})
    await asyncio.sleep(0.01)  # its publish is in flight
    live.add({"type": "output", "data": "b"})
    loop = asyncio.get_running_loop()
    began = loop.time()
    assert await live.finish(wait_s=0.2) == []  # given up: the rest is not sent with the result
    assert loop.time() - began < 0.5
    await asyncio.sleep(0.01)  # the publish in flight is cancelled
    assert live.dropped == 2


async def test_what_waits_when_the_run_ends_goes_with_the_result() -> None:
    """A short program's chunks are all still waiting when its result comes: the worker
    publishes them with the final status (one MULTI), not in a round trip of their own."""
    client = FailingRedis()
    live = LivePublisher(client, "ns:events:e", "e")  # type: ignore[arg-type]
    live.add({"type": "output", "data": "Hello\n"})
    live.add({"type": "error", "data": "oops\n", "truncated": True})
    trailing = await live.finish()
    assert client.calls == 0 and live.dropped == 0
    assert [channel for channel, _ in trailing] == ["ns:events:e"] * 2
    events = [json.loads(event) for _, event in trailing]
    assert [(e["type"], e["data"], e["seq"]) for e in events] == [
        ("output", "Hello\n", 1),
        ("error", "oops\n", 2),
    ]
    assert events[1]["truncated"] is True and "truncated" not in events[0]
    live.add({"type": "output", "data": "late"})  # nothing after the end
    assert live.dropped == 1


def test_a_live_event_is_told_from_a_status_change() -> None:
    event = live_event("e", {"type": "output", "data": "hi\n"}, 3, 1000)
    assert event == {"eval_id": "e", "type": "output", "data": "hi\n", "seq": 3, "at_ms": 1000}
    assert is_live(event) and is_live({"type": "error"})
    assert not is_live({"eval_id": "e", "status": "running", "at_ms": 1})
