"""`crucible up`: the whole stack as child processes of one command, for development and demos.

Before starting anything it checks that its ports are free (else one line: which port, who
holds it, which variable moves it). It starts each piece (`python -m app.cli <piece>`) in its
own session, pointed at the others wherever they listen, and prints its banner once every piece
answers its health check; then it records the stack for the commands run from the same folder
(`running_stack.py`), starts again a piece that exits (within a restart budget), and on Ctrl-C
stops them in an order that loses no work: API first, Redis last.
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

from redis.exceptions import RedisError

from app.cli import readiness, running_stack
from app.cli.admin import ensure_admin_key
from app.cli.ports import free_port, listeners, port_problem
from app.cli.readiness import Children, wait_ready
from app.cli.running_stack import RunningStack
from app.cli.serve import WORKER_SHUTDOWN_MS, stop_on_signals
from infra.redis_client import redact_url
from infra.settings import Settings, get_settings


def run_up(args: argparse.Namespace) -> int:
    """Start every piece as a child in its own session; Ctrl-C stops them in order."""
    s = get_settings()
    lock = running_stack.hold(s)  # held until this process ends
    if lock is None:
        running = running_stack.find(s)
        where = f" (pid {running.pid}, API {running.api_url})" if running else ""
        print(f"crucible up: a stack already runs from this folder{where}; stop it first, or set "
              "CRUCIBLE_DATA_DIR to another folder", file=sys.stderr)  # fmt: skip
        return 2
    wanted = listeners(s)
    if problem := port_problem(wanted):
        print(f"crucible up: {problem}", file=sys.stderr)
        return 2
    api, dashboard, executor = (listener.url for listener in wanted)
    env = dict(os.environ)
    if s.log_format == "auto" and sys.stderr.isatty():
        env["LOG_FORMAT"] = "console"
    # The workers and the API reach this stack's executor, wherever it listens.
    env["EXECUTOR_SERVICE_URL"] = executor
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
            port = running_stack.remembered_valkey_port(s) or free_port()
            while port in {listener.port for listener in wanted}:  # not one the pieces will take
                port = free_port()
            start("valkey", [*me, "embedded-redis", "--port", str(port)])
            if not _wait_tcp(port, 15):
                print(f"crucible up: the embedded Valkey did not start on port {port}", file=sys.stderr)
                return 1
            running_stack.remember_valkey_port(s, port)
            env["REDIS_URL"] = f"redis://127.0.0.1:{port}/0"
        redis_url = env.get("REDIS_URL") or s.redis_url_or_default
        # Workers and executor share a secret; made per run unless the environment gives one.
        env.setdefault("EXECUTOR_SECRET", secrets.token_urlsafe(32))
        try:
            admin_key = ensure_admin_key(redis_url, s)
        except (RedisError, OSError) as exc:
            print(f"crucible up: cannot reach Redis at {redact_url(redis_url)}: {exc}", file=sys.stderr)
            return 1
        for name in ("executor", "api", "worker", "scheduler", "dashboard"):
            start(name, [*me, name])
        # Celery producers' messages, unless a legacy Celery deployment consumes those queues
        ingress = bool(s.celery_wire_queues and not s.legacy_broker_url)
        if ingress:
            start("celery-ingress", [*me, "celery-ingress"])
        try:
            asked = readiness.Stack(api, dashboard, executor, admin_key, ingress)
            problem = wait_ready(children, asked, stopping)
        except readiness.Interrupted:
            print("crucible up: stopped while starting.", file=sys.stderr, flush=True)
            return 130
        if problem:
            print(f"crucible up: {problem}; stopping.", file=sys.stderr, flush=True)
            return 1
        stack = RunningStack(os.getpid(), redis_url, s.namespace, api, dashboard, executor)
        running_stack.record(s, stack)
        print(_banner(s, stack, admin_key), flush=True)
        return _watch(children, commands, env, stopping)
    finally:
        running_stack.forget(s)
        _stop_children(children)


def _wait_tcp(port: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.1)
    return False


def _banner(s: Settings, stack: RunningStack, admin_key: str) -> str:
    """Where each piece answers, and the admin key to use."""
    return (
        "\nCrucible is up:\n"
        f"  API        {stack.api_url}  (POST /api/eval)\n"
        f"  dashboard  {stack.dashboard_url}  (also {stack.api_url}/dashboard)\n"
        f"  executor   {stack.executor_url}\n"
        f"  workers    {s.worker_processes} processes x {s.worker_threads} threads\n"
        f"  scheduler  cleanup '{s.cleanup_cron}', DLQ monitor '{s.dlq_monitor_cron}'\n"
        f"  redis      {redact_url(stack.redis_url)}"
        + (f"  (embedded, data in {s.data_dir / 'valkey'})" if s.redis_url is None else "")
        + f"\n  admin key  {admin_key}  (kept in {s.data_dir / 'admin.key'})\n"
        + "             (as 'Authorization: Bearer <key>' or 'X-API-Key'; the dashboard asks for it)\n"
        + "`crucible keys|submit|migration` run from this folder use this stack.\n"
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
    if not children:
        return
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
