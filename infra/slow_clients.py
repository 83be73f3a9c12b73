"""uvicorn's HTTP protocol (httptools) with a deadline for a request's headers.

uvicorn bounds only idle keep-alive connections: a client that opens a connection and sends
its request a byte at a time (or never finishes its headers) holds the connection for as long
as it likes, and a security review kept 350 such connections open past 30 s. Here every
request's headers must be complete within `CRUCIBLE_HEADER_TIMEOUT_S` of the connection being
made, or of the previous response on it; otherwise the connection is closed. (Its body's
deadline is `evaluations.web.read_json`'s; the number of connections is uvicorn's
`limit_concurrency`.) The HTTP services name this class by its import path.
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from infra.settings import get_settings

#: uvicorn's `http` option naming this protocol.
PROTOCOL = "infra.slow_clients:HeaderDeadlineProtocol"


class HeaderDeadlineProtocol(HttpToolsProtocol):
    _header_deadline: asyncio.TimerHandle | None = None

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
        seconds = get_settings().header_timeout_s
        self._header_deadline = self.loop.call_later(seconds, self._too_slow)

    def _disarm(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _too_slow(self) -> None:
        self._header_deadline = None
        if not self.transport.is_closing():
            self.transport.close()
