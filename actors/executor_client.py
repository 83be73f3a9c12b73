"""Calls executors round-robin, skipping any that refused a connection recently."""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

import httpx
import structlog

from app.auth import executor_headers
from executor.sandbox import COMPILE_TIMEOUT_SECONDS

log = structlog.get_logger(__name__)

#: How long an executor that refused a connection is left out of the rotation.
DOWN_SECONDS = 5.0
#: Time allowed on top of the run's own time-out (and a compile step's) for the executor to answer.
ANSWER_MARGIN_SECONDS = 15.0
#: How long a worker waits for a free executor slot before the attempt fails (and is retried).
BUSY_WAIT_SECONDS = 600.0
BUSY_POLL_SECONDS = 0.05


class ExecutorUnavailable(ConnectionError):
    """No executor could be reached; the run has not started anywhere (retried as network_error)."""


class ExecutorHTTPError(Exception):
    """An executor answered with an error status; the retry policy decides by `status`."""

    def __init__(self, url: str, status: int, body: str) -> None:
        super().__init__(f"executor {url} answered {status}: {body}")
        self.status = status


class ExecutorPool:
    """Round-robin over `urls`; a connection failure marks that executor down for a while."""

    def __init__(self, urls: tuple[str, ...], client: httpx.AsyncClient, secret: str | None = None) -> None:
        if not urls:
            raise ValueError("EXECUTOR_SERVICE_URL names no executor")
        self.urls = urls
        self.client = client
        self.headers = executor_headers(secret)
        self._next = itertools.cycle(range(len(urls)))
        self._down_until: dict[str, float] = {}

    def _rotation(self) -> list[str]:
        start = next(self._next)
        ordered = [self.urls[(start + i) % len(self.urls)] for i in range(len(self.urls))]
        now = time.monotonic()
        up = [u for u in ordered if self._down_until.get(u, 0) <= now]
        return up or ordered  # all marked down: try them anyway rather than give up

    async def execute(self, payload: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """Run on the first executor with a free slot; returns (its url, the result).

        Executors that refuse connections are skipped; when every reachable one is busy, wait
        a moment and ask again (up to `BUSY_WAIT_SECONDS`). If the answer is lost after the
        request went out, the attempt is killed there before the error propagates, so no run
        goes on unwatched.
        """
        eval_id = payload["eval_id"]
        # every language gets the compile budget: a worker cannot tell which ones an executor
        # compiles, and giving up on a slow compile would only run it again
        answer_within = float(payload["timeout"]) + COMPILE_TIMEOUT_SECONDS + ANSWER_MARGIN_SECONDS
        timeout = httpx.Timeout(answer_within, connect=2.0)
        deadline = time.monotonic() + BUSY_WAIT_SECONDS
        while True:
            unreachable: list[str] = []
            for url in self._rotation():
                try:
                    response = await self.client.post(
                        f"{url}/execute", json=payload, timeout=timeout, headers=self.headers
                    )
                except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                    self._down_until[url] = time.monotonic() + DOWN_SECONDS
                    log.warning("executor.down", executor=url, error=str(exc))
                    unreachable.append(f"{url}: {exc}")
                    continue
                except (httpx.HTTPError, asyncio.CancelledError):
                    await asyncio.shield(self.kill(url, eval_id, attempt_only=True))
                    raise
                if response.status_code == 503 and _is_busy(response):
                    continue
                if response.status_code >= 400:
                    raise ExecutorHTTPError(url, response.status_code, response.text[:500])
                return url, response.json()
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
                response = await self.client.get(f"{url}/languages", timeout=5.0, headers=self.headers)
                response.raise_for_status()
                return response.json()
            except (httpx.HTTPError, ValueError) as exc:
                failures.append(f"{url}: {exc}")
        raise ExecutorUnavailable("; ".join(failures))

    async def kill(self, url: str, eval_id: str, attempt_only: bool = False) -> bool:
        """Stop `eval_id` on one executor; True if it was running there.

        A cancel also makes the executor refuse to start it later; `attempt_only` (a worker
        abandoning its own attempt) does not, so the next delivery can run. The time allowed
        stays under the 1 s Dramatiq gives an interrupted coroutine to finish.
        """
        params = {"attempt_only": "true"} if attempt_only else {}
        try:
            response = await self.client.post(
                f"{url}/kill/{eval_id}", params=params, timeout=0.8, headers=self.headers
            )
            return response.status_code == 200 and response.json().get("killed") is True
        except (httpx.HTTPError, ValueError) as exc:
            log.warning("executor.kill_failed", executor=url, eval_id=eval_id, error=str(exc))
            return False

    async def kill_everywhere(self, eval_id: str) -> bool:
        """Stop `eval_id` on whichever executor runs it (and keep the others from starting it)."""
        results = await asyncio.gather(*(self.kill(url, eval_id) for url in self.urls))
        return any(results)


def _is_busy(response: httpx.Response) -> bool:
    try:
        return response.json().get("details", {}).get("busy") is True
    except ValueError:
        return False
