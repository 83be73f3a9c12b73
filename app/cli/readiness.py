"""When every piece `crucible up` started answers, so its banner tells the truth.

The executor, API and dashboard answer their `/health`. Workers and the scheduler are counted
by their heartbeats, but only those of the processes this `up` started: a beat left in Redis by
a piece that stopped a moment ago, or by another deployment sharing the Redis, does not count.
Each piece is reported as it first answers, so `up` can say so in a line of its own. Calls are
marked probes (the pieces log them only at DEBUG) and go straight to the pieces, never through
an HTTP proxy the environment names.
"""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx
import psutil

#: How long every piece has to answer its health check before `crucible up` gives up.
READY_TIMEOUT_S = 90.0

Children = list[tuple[str, subprocess.Popen[bytes]]]


class Interrupted(Exception):
    """Ctrl-C (or SIGTERM) came before every piece answered."""


@dataclass(frozen=True)
class Stack:
    """What to ask: where the pieces answer, and the admin key for the API's status."""

    api: str
    dashboard: str
    executor: str
    admin_key: str
    ingress: bool


@dataclass(frozen=True)
class Problem:
    """Why the stack did not come up: one line, and the pieces whose logs tell more."""

    line: str
    pieces: tuple[str, ...]


#: The pieces whose readiness is asked here (Valkey's is `crucible up`'s own TCP check).
ASKED = ("executor", "api", "worker", "scheduler", "dashboard", "celery-ingress")
#: How a piece is named to a person: in its ready line, the banner, or what does not answer.
LABELS = {"api": "API", "worker": "workers"}


def wait_ready(
    children: Children, stack: Stack, stopping: threading.Event, on_ready: Callable[[str], None]
) -> Problem | None:
    """Wait until every piece answers, calling `on_ready(piece)` once for each as it first does
    (in start order); None then, else what did not (a piece that exited, or those still silent
    after READY_TIMEOUT_S). Interrupted if told to stop."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    announced: set[str] = set()
    pieces = [name for name, _ in children if name in ASKED]
    with httpx.Client(timeout=2.0, trust_env=False) as http:
        while not stopping.is_set():
            for name, process in children:
                if process.poll() is not None:
                    return Problem(f"the {name} exited while starting (code {process.returncode})", (name,))
            waiting = not_ready(http, children, stack)
            for name in pieces:
                if name not in waiting and name not in announced:
                    announced.add(name)
                    on_ready(name)
            if not waiting:
                return None
            if time.monotonic() > deadline:
                line = f"no answer from the {', '.join(waiting.values())} within {READY_TIMEOUT_S:g} s"
                return Problem(line, tuple(waiting))
            stopping.wait(0.3)
    raise Interrupted


def not_ready(http: httpx.Client, children: Children, stack: Stack) -> dict[str, str]:
    """The pieces that do not answer yet, each with how to name it in a line. Every request is
    marked a probe, so the pieces log it only at DEBUG (infra/logs.py)."""
    started = {name for name, _ in children}
    waiting = {name: name for name, url in (("executor", stack.executor), ("dashboard", stack.dashboard))
               if not _answers(http, url)}  # fmt: skip
    try:
        health = http.get(f"{stack.api}/health", params={"probe": 1}).json()
        status = http.get(
            f"{stack.api}/api/celery-status", params={"probe": 1}, headers={"x-api-key": stack.admin_key}
        ).json()
    except (httpx.HTTPError, ValueError):
        behind = {name: LABELS.get(name, name) for name in ("api", "worker", "scheduler", "celery-ingress")}
        return {**waiting, **{name: label for name, label in behind.items() if name in started}}
    if not health.get("executors_online"):
        waiting["api"] = "API (it does not reach the executor yet)"
    online = {w["name"] for w in (status.get("worker_stats") or {}).values() if w.get("online")}
    online |= {s["name"] for s in status.get("schedulers") or [] if s.get("online")}
    for name in ("worker", "scheduler"):
        if not online & _names(children, name):
            waiting[name] = LABELS.get(name, name)
    if stack.ingress and (health.get("celery_wire") or {}).get("ingress") != "running":
        waiting["celery-ingress"] = "celery-ingress"
    return waiting


def _names(children: Children, piece: str) -> set[str]:
    """How the processes of one piece name themselves in heartbeats (`host:pid`)."""
    host = socket.gethostname()
    names = set()
    for name, process in children:
        if name != piece:
            continue
        try:
            pids = [process.pid, *(p.pid for p in psutil.Process(process.pid).children(recursive=True))]
        except psutil.Error:
            continue
        names |= {f"{host}:{pid}" for pid in pids}
    return names


def _answers(http: httpx.Client, url: str) -> bool:
    try:
        return http.get(f"{url}/health", params={"probe": 1}).status_code < 500
    except httpx.HTTPError:
        return False
