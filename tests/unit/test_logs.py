"""`configure_logging` renders for the reader the lines reach: structlog's console rendering for
a person, JSON otherwise, the same for uvicorn's and Dramatiq's stdlib lines; answered probes
only at DEBUG."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Iterator

import pytest
import structlog

from infra import logs

Configure = Callable[..., io.StringIO]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def configure(monkeypatch: pytest.MonkeyPatch) -> Iterator[Configure]:
    """configure_logging into a fresh stream, as if this process had not configured logging yet;
    the process's own set-up is put back afterwards."""
    root = logging.getLogger()
    access = logging.getLogger("uvicorn.access")
    saved = (root.handlers[:], root.level, access.filters[:], structlog.get_config())

    def run(fmt: str, level: str = "INFO", terminal: bool = False) -> io.StringIO:
        monkeypatch.setattr(logs, "_configured", False)
        monkeypatch.setattr(logs, "is_terminal", lambda: terminal)
        stream = Terminal() if terminal else io.StringIO()
        logs.configure_logging(level, fmt, stream=stream)
        return stream

    yield run
    root.handlers[:], access.filters[:] = saved[0], saved[2]
    root.setLevel(saved[1])
    structlog.reset_defaults()
    structlog.configure(**saved[3])


def log_both() -> None:
    """One line of our own, one of uvicorn's (a stdlib logger, as Dramatiq's are)."""
    structlog.get_logger("crucible.test").info("evaluation.done", eval_id="eval_1")
    logging.getLogger("uvicorn.error").info("Started server process [%d]", 42)


def test_json_renders_every_line_as_json(configure: Configure) -> None:
    out = configure("json", terminal=True)  # forced, even on a terminal
    log_both()
    ours, uvicorns = (json.loads(line) for line in out.getvalue().splitlines())
    assert ours["event"] == "evaluation.done" and ours["eval_id"] == "eval_1" and ours["level"] == "info"
    assert uvicorns["event"] == "Started server process [42]" and uvicorns["logger"] == "uvicorn.error"


@pytest.mark.parametrize("fmt", ["console", "auto"])
def test_console_on_a_terminal_has_no_json_and_colours(configure: Configure, fmt: str) -> None:
    out = configure(fmt, terminal=True)
    log_both()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and not any(line.lstrip().startswith("{") for line in lines)
    assert "evaluation.done" in lines[0] and "eval_1" in lines[0]
    assert "Started server process [42]" in lines[1] and "uvicorn.error" in lines[1]
    assert "\x1b[" in out.getvalue()  # colours: the lines go straight to a terminal


def test_console_to_a_file_has_no_colours(configure: Configure) -> None:
    out = configure("console")
    log_both()
    assert "evaluation.done" in out.getvalue() and "\x1b[" not in out.getvalue()
    assert not out.getvalue().startswith("{")


def test_auto_off_a_terminal_is_json(configure: Configure) -> None:
    out = configure("auto", terminal=False)
    log_both()
    assert [json.loads(line)["event"] for line in out.getvalue().splitlines()] == [
        "evaluation.done", "Started server process [42]",
    ]  # fmt: skip


def access(path: str, status: int = 200, method: str = "GET") -> None:
    """A line as uvicorn's access logger writes it."""
    logging.getLogger("uvicorn.access").info(
        '%s - "%s %s HTTP/%s" %d', "127.0.0.1:5000", method, path, "1.1", status
    )


def test_answered_probes_are_logged_only_at_debug(configure: Configure) -> None:
    out = configure("json")
    for probe in ("/health", "/running", "/health?probe=1", "/api/celery-status?probe=1"):
        access(probe)
    access("/health", status=503)  # a failed probe is worth a line
    access("/api/eval", method="POST")
    access("/api/celery-status?probed=1")
    events = [json.loads(line)["event"] for line in out.getvalue().splitlines()]
    assert events == [
        '127.0.0.1:5000 - "GET /health HTTP/1.1" 503',
        '127.0.0.1:5000 - "POST /api/eval HTTP/1.1" 200',
        '127.0.0.1:5000 - "GET /api/celery-status?probed=1 HTTP/1.1" 200',
    ]

    out = configure("json", level="DEBUG")
    access("/health")
    line = json.loads(out.getvalue())
    assert line["level"] == "debug" and "/health" in line["event"]
