"""When every piece `crucible up` started answers, so its banner tells the truth.

The executor, API and dashboard answer their `/health`. Workers and the scheduler are counted
by their heartbeats, but only those of the processes this `up` started: a beat left in Redis by
a piece that stopped a moment ago, or by another deployment sharing the Redis, does not count.
Calls go straight to the pieces, never through an HTTP proxy the environment names.
"""

from __future__ import annotations

import socket
import subprocess
import threading
import time
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


def wait_ready(children: Children, stack: Stack, stopping: threading.Event) -> str | None:
    """Wait until every piece answers; None then, else a line on what did not (a piece that
    exited, or those still silent after READY_TIMEOUT_S). Interrupted if told to stop."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    with httpx.Client(timeout=2.0, trust_env=False) as http:
        while not stopping.is_set():
            for name, process in children:
                if process.poll() is not None:
                    code = process.returncode
                    return f"the {name} exited while starting (code {code}): see its lines above"
            waiting = not_ready(http, children, stack)
            if not waiting:
                return None
            if time.monotonic() > deadline:
                return f"no answer from the {', '.join(waiting)} within {READY_TIMEOUT_S:g} s"
            stopping.wait(0.3)
    raise Interrupted


def not_ready(http: httpx.Client, children: Children, stack: Stack) -> list[str]:
    """The pieces that do not answer yet."""
    waiting = [name for name, url in (("executor", stack.executor), ("dashboard", stack.dashboard))
               if not _answers(http, url)]  # fmt: skip
    try:
        health = http.get(f"{stack.api}/health").json()
        status = http.get(f"{stack.api}/api/celery-status", headers={"x-api-key": stack.admin_key}).json()
    except (httpx.HTTPError, ValueError):
        return ["API", *waiting]
    if not health.get("executors_online"):
        waiting.append("executor (as the API sees it)")
    online = {w["name"] for w in (status.get("worker_stats") or {}).values() if w.get("online")}
    online |= {s["name"] for s in status.get("schedulers") or [] if s.get("online")}
    for name in ("worker", "scheduler"):
        if not online & _names(children, name):
            waiting.append(f"{name}s" if name == "worker" else name)
    if stack.ingress and (health.get("celery_wire") or {}).get("ingress") != "running":
        waiting.append("celery-ingress")
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
        return http.get(f"{url}/health").status_code < 500
    except httpx.HTTPError:
        return False
