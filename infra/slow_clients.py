"""uvicorn's HTTP protocol (httptools) with a deadline for a request's headers.

uvicorn bounds only idle keep-alive connections: a client that opens a connection and sends
its request a byte at a time (or never finishes its headers) holds the connection for as long
as it likes, and a security review kept 350 such connections open past 30 s. Here every
request's headers must be complete within `CRUCIBLE_HEADER_TIMEOUT_S` of the connection being
made, or of the previous response on it; otherwise the connection is closed. (Its body's
deadline is `infra.web.read_json`'s; the number of connections is uvicorn's
`limit_concurrency`.) The HTTP services hand uvicorn `header_deadline_protocol(seconds)`.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


def header_deadline_protocol(seconds: float) -> Any:
    """uvicorn's `http` option: this protocol with a deadline of `seconds` for each request's
    headers (a partial of the class, which uvicorn calls as it calls a protocol class)."""
    return functools.partial(HeaderDeadlineProtocol, header_timeout_s=seconds)


class HeaderDeadlineProtocol(HttpToolsProtocol):
    _header_deadline: asyncio.TimerHandle | None = None

    def __init__(self, *args: Any, header_timeout_s: float, **kwargs: Any) -> None:
        self.header_timeout_s = header_timeout_s
        super().__init__(*args, **kwargs)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        pipelined = bool(self.pipeline)  # a next request whose headers are in already
        super().on_response_complete()
        if not pipelined and not self.transport.is_closing():
            self._arm()  # the next request on this connection gets a deadline of its own

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._header_deadline = self.loop.call_later(self.header_timeout_s, self._too_slow)

    def _disarm(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _too_slow(self) -> None:
        self._header_deadline = None
        if not self.transport.is_closing():
            self.transport.close()
