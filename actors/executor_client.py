"""Calls executors round-robin, skipping any that refused a connection recently.

On aiohttp rather than httpx, the project's other HTTP client: a worker makes one request per
evaluation, and httpx's pure-Python HTTP/1.1 costs ~550 µs of CPU a request against aiohttp's
~75 µs (measured with both against one uvicorn endpoint), a third of a worker's CPU per run.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import structlog

from evaluations import json_codec
from evaluations.languages import COMPILE_TIMEOUT_SECONDS, wall_limit
from infra.credentials import executor_headers

log = structlog.get_logger(__name__)

#: How long an executor that refused a connection is left out of the rotation.
DOWN_SECONDS = 5.0
#: Time allowed on top of the run's own time-out (and a compile step's) for the executor to answer.
ANSWER_MARGIN_SECONDS = 15.0
#: What `/execute` answers with the run's output as it writes it, line by line, then its result.
NDJSON = "application/x-ndjson"
#: Handed each chunk of a streamed run's output.
LiveSink = Callable[[dict[str, Any]], None]
#: How long a worker waits for a free executor slot before the attempt fails (and is retried).
BUSY_WAIT_SECONDS = 600.0
BUSY_POLL_SECONDS = 0.05


class ExecutorUnavailable(ConnectionError):
    """No executor could be reached; the run has not started anywhere (retried as network_error)."""


class ExecutorConnectionLost(ConnectionError):
    """The request reached an executor but its answer did not come back (retried as
    network_error); the attempt there has been stopped."""


class ExecutorHTTPError(Exception):
    """An executor answered with an error status; the retry policy decides by `status`."""

    def __init__(self, url: str, status: int, body: str) -> None:
        super().__init__(f"executor {url} answered {status}: {body}")
        self.status = status


#: Idle connections are dropped before uvicorn's 5 s keep-alive would close them under us.
KEEPALIVE_SECONDS = 4.0


class ExecutorPool:
    """Round-robin over `urls`; a connection failure marks that executor down for a while.

    Its connections are opened on the event loop of its first request; `close()` them there.
    """

    def __init__(self, urls: tuple[str, ...], secret: str | None = None) -> None:
        if not urls:
            raise ValueError("EXECUTOR_SERVICE_URL names no executor")
        self.urls = urls
        self.headers = executor_headers(secret)
        self._next = itertools.cycle(range(len(urls)))
        self._down_until: dict[str, float] = {}
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=KEEPALIVE_SECONDS)
            self._session = aiohttp.ClientSession(
                connector=connector, headers=self.headers, json_serialize=json_codec.dumps
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None  # a later call opens a new one
            await session.close()

    async def _post(self, url: str, timeout: aiohttp.ClientTimeout, **options: Any) -> tuple[int, bytes]:
        async with self.session.post(url, timeout=timeout, **options) as response:
            return response.status, await response.read()

    async def _post_live(
        self, url: str, timeout: aiohttp.ClientTimeout, payload: dict[str, Any], live: LiveSink
    ) -> tuple[int, bytes]:
        """`/execute` asking for the streamed answer: each chunk of output is handed to `live`
        as it comes; then the status and body the unstreamed answer would have had. An answer
        not streamed (refused, busy, cancelled before it started) is read as it is."""
        headers = {"accept": NDJSON}
        async with self.session.post(url, timeout=timeout, json=payload, headers=headers) as response:
            if response.content_type != NDJSON:
                return response.status, await response.read()
            result: tuple[int, bytes] | None = None
            # read to its end, the result line included: a connection whose answer was left
            # unread is closed rather than kept alive for the next run
            async for line in _lines(response.content):
                message = json_codec.loads(line)
                if message.get("type") == "result":
                    result = int(message["status"]), json_codec.dumps(message["body"]).encode()
                elif result is None:
                    live(message)
        if result is None:
            raise aiohttp.ClientPayloadError("the executor's streamed answer ended without its result")
        return result

    def _rotation(self) -> list[str]:
        start = next(self._next)
        ordered = [self.urls[(start + i) % len(self.urls)] for i in range(len(self.urls))]
        now = time.monotonic()
        up = [u for u in ordered if self._down_until.get(u, 0) <= now]
        return up or ordered  # all marked down: try them anyway rather than give up

    async def execute(
        self, payload: dict[str, Any], wall_s: float | None = None, live: LiveSink | None = None
    ) -> tuple[str, dict[str, Any]]:
        """Run on the first executor with a free slot; returns (its url, the result). `wall_s`:
        the wall-clock seconds the run may take at its limits (all its cases), else its timeout's.
        `live` is handed each chunk of the program's output as the executor streams it
        (`{"type": "output" or "error", "data", "truncated"?}`, see `evaluations.live_output`).

        Executors that refuse connections are skipped; when every reachable one is busy, wait
        a moment and ask again (up to `BUSY_WAIT_SECONDS`). If the answer is lost after the
        request went out, the attempt is killed there before the error propagates, so no run
        goes on unwatched.
        """
        eval_id = payload["eval_id"]
        timeout = answer_timeout(wall_s or wall_limit(float(payload["timeout"])))
        deadline = time.monotonic() + BUSY_WAIT_SECONDS
        while True:
            unreachable: list[str] = []
            for url in self._rotation():
                try:
                    if live is None:
                        status, body = await self._post(f"{url}/execute", timeout, json=payload)
                    else:
                        status, body = await self._post_live(f"{url}/execute", timeout, payload, live)
                except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
                    self._down_until[url] = time.monotonic() + DOWN_SECONDS
                    log.warning("executor.down", executor=url, error=str(exc))
                    unreachable.append(f"{url}: {exc}")
                    continue
                except (aiohttp.ClientError, TimeoutError, asyncio.CancelledError) as exc:
                    await asyncio.shield(self.kill(url, eval_id, attempt_only=True))
                    if isinstance(exc, asyncio.CancelledError):
                        raise
                    raise ExecutorConnectionLost(f"{url}: no answer ({type(exc).__name__}: {exc})") from exc
                if status == 503 and _is_busy(body):
                    continue
                if status >= 400:
                    raise ExecutorHTTPError(url, status, body[:500].decode(errors="replace"))
                return url, json_codec.loads(body)
            if len(unreachable) == len(self.urls):
                raise ExecutorUnavailable("; ".join(unreachable))
            if time.monotonic() > deadline:
                raise ExecutorHTTPError("all executors", 503, f"busy for {BUSY_WAIT_SECONDS}s")
            await asyncio.sleep(BUSY_POLL_SECONDS)

    async def languages(self) -> dict[str, Any]:
        """The first reachable executor's `GET /languages` (name, version, compiled): what
        actually runs submissions, rather than what happens to be installed where the caller is."""
        failures: list[str] = []
        for url in self._rotation():
            try:
                timeout = aiohttp.ClientTimeout(total=5.0)
                async with self.session.get(f"{url}/languages", timeout=timeout) as response:
                    response.raise_for_status()
                    return json_codec.loads(await response.read())
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                failures.append(f"{url}: {exc!r}")
        raise ExecutorUnavailable("; ".join(failures))

    async def kill(self, url: str, eval_id: str, attempt_only: bool = False) -> bool:
        """Stop `eval_id` on one executor; True if it was running there.

        A cancel also makes the executor refuse to start it later; `attempt_only` (a worker
        abandoning its own attempt) does not, so the next delivery can run. The time allowed
        stays under the 1 s Dramatiq gives an interrupted coroutine to finish.
        """
        params = {"attempt_only": "true"} if attempt_only else {}
        try:
            timeout = aiohttp.ClientTimeout(total=0.8)
            status, body = await self._post(f"{url}/kill/{eval_id}", timeout, params=params)
            return status == 200 and json_codec.loads(body).get("killed") is True
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            log.warning("executor.kill_failed", executor=url, eval_id=eval_id, error=str(exc))
            return False

    async def kill_everywhere(self, eval_id: str) -> bool:
        """Stop `eval_id` on whichever executor runs it (and keep the others from starting it)."""
        results = await asyncio.gather(*(self.kill(url, eval_id) for url in self.urls))
        return any(results)


def answer_timeout(wall_s: float) -> aiohttp.ClientTimeout:
    """How long to wait for the answer of a run that may take `wall_s` seconds. Every language
    gets the compile budget: a worker cannot tell which ones an executor compiles, and giving
    up on a slow compile would only run it again."""
    total = wall_s + COMPILE_TIMEOUT_SECONDS + ANSWER_MARGIN_SECONDS
    return aiohttp.ClientTimeout(total=total, connect=2.0)


async def _lines(stream: aiohttp.StreamReader) -> AsyncIterator[bytes]:
    """The lines of a streamed answer, however long (the result's may hold the whole output)."""
    waiting = bytearray()
    async for data in stream.iter_any():
        start = len(waiting)
        waiting += data
        while (end := waiting.find(b"\n", start)) >= 0:
            yield bytes(waiting[:end])
            del waiting[: end + 1]
            start = 0


def _is_busy(body: bytes) -> bool:
    try:
        return json_codec.loads(body).get("details", {}).get("busy") is True
    except (ValueError, AttributeError):
        return False
