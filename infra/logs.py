"""structlog set-up, done once per process: lines for the reader they reach.

`LOG_FORMAT=auto` renders for a person (structlog's console renderer) when this process's
stderr or stdout is a terminal, and JSON otherwise (a file, a pipe, a log collector); `console`
and `json` force one. Colours only when the lines go straight to a terminal, so a log file
holds no escape codes. Standard-library loggers (uvicorn, Dramatiq, periodiq) go through the
same ProcessorFormatter, so every line of a process has one format. Code binds `eval_id` with
`bind_contextvars`.

Terminals are told by file descriptor, and lines go to `sys.stderr` as it is when written:
Dramatiq's worker processes swap `sys.stderr` for a pipe to their parent (which writes where
the parent's stderr goes), and must still render for the terminal at the end of it.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

import structlog

#: What LOG_FORMAT may be.
FORMATS = ("auto", "console", "json")
#: Answered by every probe (load balancers, the API's view of its executors, `crucible up`).
PROBE_PATHS = frozenset({"/health", "/running"})
#: A query parameter a caller adds to say its request is a probe (`crucible up`'s readiness).
PROBE_MARK = "probe=1"

_configured = False


def is_terminal() -> bool:
    """Whether this process's stderr or stdout is a terminal (a person reads what it writes)."""
    return any(_isatty(fd) for fd in (2, 1))


def renders_console(fmt: str) -> bool:
    """Whether LOG_FORMAT `fmt` renders lines for a person here (else JSON)."""
    return fmt == "console" or (fmt == "auto" and is_terminal())


def configure_logging(level: str = "INFO", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Configure structlog and the stdlib root logger (to `stream`, else the current stderr);
    later calls do nothing, so each entry point may call it."""
    global _configured
    if _configured:
        return
    _configured = True

    console = renders_console(fmt)
    colours = stream.isatty() if stream is not None else _isatty(2)
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]
    renderer: structlog.types.Processor = (
        structlog.dev.ConsoleRenderer(colors=colours) if console else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        # filter first: a line below the level costs one check, not the whole chain
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            *([] if console else [structlog.processors.format_exc_info]),
            renderer,
        ],
    )
    handler = logging.StreamHandler(stream) if stream is not None else _CurrentStderr()
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    logging.getLogger("uvicorn.access").addFilter(QuietProbes())


class QuietProbes(logging.Filter):
    """uvicorn's access lines of answered probes (`GET /health`, the executor's `GET /running`,
    requests marked `probe=1`) are logged at DEBUG: asked every few seconds by load balancers,
    the API's view of its executors and `crucible up`, they would drown the requests worth
    reading. A failed probe stays at its level."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if not (isinstance(args, tuple) and len(args) == 5):  # (client, method, path, version, status)
            return True
        _, method, target, _, status = args
        path, _, query = str(target).partition("?")
        probe = method in ("GET", "HEAD") and (path in PROBE_PATHS or PROBE_MARK in query.split("&"))
        if not probe or not isinstance(status, int) or status >= 400:
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


class _CurrentStderr(logging.StreamHandler):
    """A handler to `sys.stderr` as it is at each line, not as it was at set-up (see above)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        """Ignored: the stream is always the current stderr."""


def _isatty(fd: int) -> bool:
    try:
        return os.isatty(fd)
    except OSError:
        return False
