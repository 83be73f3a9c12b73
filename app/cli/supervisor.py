"""`crucible up`: the whole stack as child processes of one command, for development and demos.

It starts each piece (`python -m app.cli <piece>`) in its own session, waits for their health
checks, starts again a piece that exits (within a restart budget), and on Ctrl-C stops them
in an order that loses no work: API first, Redis last.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx

from app.cli.admin import ensure_admin_key
from app.cli.ports import free_port
from app.cli.serve import WORKER_SHUTDOWN_MS, stop_on_signals
from evaluations.settings import Settings, get_settings

Children = list[tuple[str, subprocess.Popen[bytes]]]


def _wait_http(url: str, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1.0).status_code < 500:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    return False


def _wait_tcp(port: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.1)
    return False


def run_up(args: argparse.Namespace) -> int:
    """Start every piece as a child in its own session; Ctrl-C stops them in order."""
    s = get_settings()
    env = dict(os.environ)
    if s.log_format == "auto" and sys.stderr.isatty():
        env["LOG_FORMAT"] = "console"
    me = [sys.executable, "-m", "app.cli"]
    children: Children = []
    commands: dict[str, list[str]] = {}

    def start(name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(argv, env=env, start_new_session=True)
        children.append((name, process))
        commands[name] = argv
        return process

    stopping = stop_on_signals()
    try:
        if s.redis_url is None:
            port = free_port()
            start("valkey", [*me, "embedded-redis", "--port", str(port)])
            if not _wait_tcp(port, 15):
                print("embedded Valkey did not start", file=sys.stderr)
                return 1
            env["REDIS_URL"] = f"redis://127.0.0.1:{port}/0"
        # Workers and executor share a secret; made per run unless the environment gives one.
        env.setdefault("EXECUTOR_SECRET", secrets.token_urlsafe(32))
        admin_key = ensure_admin_key(env.get("REDIS_URL") or s.redis_url_or_default, s)
        for name in ("executor", "api", "worker", "scheduler", "dashboard"):
            start(name, [*me, name])
        # Celery producers' messages, unless a legacy Celery deployment consumes those queues
        if s.celery_wire_queues and not s.legacy_broker_url:
            start("celery-ingress", [*me, "celery-ingress"])
        api = f"http://{s.api_host}:{s.api_port}"
        executor = f"http://{s.executor_host}:{s.executor_port}"
        ready = _wait_http(f"{executor}/health", 30) and _wait_http(f"{api}/health", 30)
        print(_banner(s, env, api, executor, admin_key, ready), flush=True)
        return _watch(children, commands, env, stopping)
    finally:
        _stop_children(children)


def _banner(s: Settings, env: dict[str, str], api: str, executor: str, admin_key: str, ready: bool) -> str:
    """Where each piece answers, and the admin key to use."""
    return (
        "\nCrucible is up:\n"
        f"  API        {api}  (POST /api/eval)\n"
        f"  dashboard  http://{s.dashboard_host}:{s.dashboard_port}  (also {api}/dashboard)\n"
        f"  executor   {executor}\n"
        f"  workers    {s.worker_processes} processes x {s.worker_threads} threads\n"
        f"  scheduler  cleanup '{s.cleanup_cron}', DLQ monitor '{s.dlq_monitor_cron}'\n"
        f"  redis      {env.get('REDIS_URL') or s.redis_url}"
        + (f"  (embedded, data in {s.data_dir / 'valkey'})" if s.redis_url is None else "")
        + f"\n  admin key  {admin_key}\n"
        + "             (as 'Authorization: Bearer <key>' or 'X-API-Key'; the dashboard asks for it)\n"
        + ("" if ready else "  (some piece did not answer its health check: see the logs above)\n")
        + "Press Ctrl-C to stop.\n"
    )


def _watch(
    children: Children, commands: dict[str, list[str]], env: dict[str, str], stopping: threading.Event
) -> int:
    """Start again a piece that exits, until Ctrl-C (0) or a piece keeps exiting (1)."""
    restarts = RestartBudget()
    while not stopping.wait(0.2):
        for index, (name, process) in enumerate(children):
            if process.poll() is None:
                continue
            # A worker process killed by the OOM killer takes its whole `crucible worker`
            # down (Dramatiq stops the rest): start it again; its runs come back by heartbeat.
            if not restarts.allow(name):
                print(f"{name} keeps exiting (code {process.returncode}); stopping.", flush=True)
                return 1
            print(f"{name} exited (code {process.returncode}); starting it again.", flush=True)
            children[index] = (name, subprocess.Popen(commands[name], env=env, start_new_session=True))
    return 0


class RestartBudget:
    """At most `limit` restarts of one piece within `window_s`: a crash loop stops the stack."""

    def __init__(self, limit: int = 5, window_s: float = 60.0) -> None:
        self.limit = limit
        self.window_s = window_s
        self.times: dict[str, list[float]] = {}

    def allow(self, name: str) -> bool:
        now = time.monotonic()
        recent = [t for t in self.times.get(name, []) if now - t < self.window_s]
        self.times[name] = [*recent, now]
        return len(recent) < self.limit


def _stop_children(children: Children) -> None:
    """API first (no new work), then workers (finish or hand back), executor, Redis last."""
    order = ["api", "dashboard", "celery-ingress", "scheduler", "worker", "executor", "valkey"]
    for name in order:
        for child_name, process in children:
            if child_name != name or process.poll() is not None:
                continue
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=WORKER_SHUTDOWN_MS / 1000 + 10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    print("Crucible stopped.", flush=True)
