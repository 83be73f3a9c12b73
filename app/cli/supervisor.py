"""`crucible up`: the whole stack as child processes of one command, for development and demos.

Before starting anything it checks that its ports are free (else one line: which port, who
holds it, which variable moves it). It starts each piece (`python -m app.cli <piece>`) in its
own session, pointed at the others wherever they listen, prints a line for each piece as it
answers its health check and its banner once every piece does; then it records the stack for
the commands run from the same folder (`running_stack.py`), starts again a piece that exits
(within a restart budget), and on Ctrl-C stops them in an order that loses no work: API first, Redis last.

The pieces' own logs go to `<data>/logs/<piece>.log` (the previous start's to `<piece>.log.1`),
so start-up reads as a list and the banner; `CRUCIBLE_UP_LOGS=show` puts them on `up`'s output
instead. When a piece exits or does not answer, the last lines of its log are shown: the reason
is always on screen.
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
from collections.abc import Callable
from pathlib import Path

from redis.exceptions import RedisError

from app.cli import ha, readiness, running_stack
from app.cli.admin import ensure_admin_key
from app.cli.ports import free_port, listeners, port_problem
from app.cli.readiness import LABELS, Children, Problem, wait_ready
from app.cli.running_stack import RunningStack
from app.cli.serve import WORKER_SHUTDOWN_MS, stop_on_signals
from infra.logs import is_terminal
from infra.redis_client import describe_redis, redact_url
from infra.settings import Settings, get_settings

#: Where, in the data folder, the pieces' own logs go when `up` does not show them.
LOGS_DIR = "logs"
#: How many of its log's last lines are shown for a piece that exits or does not answer.
TAIL_LINES = 20

Spawn = Callable[[str], "subprocess.Popen[bytes]"]


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
    if s.log_format == "auto" and is_terminal():
        env["LOG_FORMAT"] = "console"  # also in the log files: the person at this terminal reads them
    # The workers and the API reach this stack's executor, wherever it listens.
    env["EXECUTOR_SERVICE_URL"] = executor
    logs = _log_folder(s)
    me = [sys.executable, "-m", "app.cli"]
    children: Children = []
    commands: dict[str, list[str]] = {}

    def spawn(name: str) -> subprocess.Popen[bytes]:
        """Start (or start again) one piece, its output on ours or appended to its log file."""
        if logs is None:
            return subprocess.Popen(commands[name], env=env, start_new_session=True)
        with open(logs / f"{name}.log", "ab") as out:
            return subprocess.Popen(commands[name], env=env, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip

    def start(name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        if logs is not None:  # this start's log from its first line; the previous one kept beside it
            log = logs / f"{name}.log"
            if log.exists():
                log.replace(log.with_name(f"{name}.log.1"))
        commands[name] = argv
        process = spawn(name)
        children.append((name, process))
        return process

    stopping = stop_on_signals()
    try:
        if getattr(args, "ha", False):
            if s.redis_url is not None or s.redis_sentinels:
                print("crucible up --ha: it starts its own Redis; unset REDIS_URL and REDIS_SENTINELS",
                      file=sys.stderr)  # fmt: skip
                return 2
            taken = {listener.port for listener in wanted}
            topology = ha.Topology(*_free_ports(2, taken), tuple(_free_ports(3, taken)))  # type: ignore[arg-type]
            folder = s.data_dir / "valkey-ha"
            for old in folder.glob("sentinel-*.conf"):  # new ports each start: what they learnt is stale
                old.unlink()
            for name, argv in topology.commands(folder).items():
                start(name, argv)
            ports = [topology.primary, topology.replica, *topology.sentinels]
            started = all(_wait_tcp(port, 15) for port in ports)
            if not started or not ha.wait_in_step(topology.primary, topology.sentinels):
                _fail(Problem("the primary, replica or Sentinels did not start", ("valkey-primary",)), logs)
                return 1
            env.update({"REDIS_SENTINELS": topology.sentinels_setting, "REDIS_SENTINEL_MASTER": ha.MASTER})
            env.setdefault("CRUCIBLE_REDIS_MIN_REPLICAS", "1")
            env["REDIS_URL"] = f"redis://127.0.0.1:{topology.primary}/0"  # its database; Sentinels say where
            where = f"primary :{topology.primary}, replica :{topology.replica}"
            _ready("valkey", f"{where}, Sentinels {topology.sentinels_setting}; answers once on a replica")
        elif s.redis_url is None and not s.redis_sentinels:
            port = running_stack.remembered_valkey_port(s) or free_port()
            while port in {listener.port for listener in wanted}:  # not one the pieces will take
                port = free_port()
            start("valkey", [*me, "embedded-redis", "--port", str(port)])
            if not _wait_tcp(port, 15):
                _fail(Problem(f"the embedded Valkey did not start on port {port}", ("valkey",)), logs)
                return 1
            running_stack.remember_valkey_port(s, port)
            env["REDIS_URL"] = f"redis://127.0.0.1:{port}/0"
            _ready("valkey", f"127.0.0.1:{port}  (embedded)")
        redis_url = env.get("REDIS_URL") or s.redis_url_or_default
        # Workers and executor share a secret; made per run unless the environment gives one.
        env.setdefault("EXECUTOR_SECRET", secrets.token_urlsafe(32))
        try:
            admin_key = ensure_admin_key(redis_url, s)
        except (RedisError, OSError) as exc:
            print(f"crucible up: cannot reach Redis at {redact_url(redis_url)}: {exc}", file=sys.stderr)
            return 1
        if s.redis_url is not None or s.redis_sentinels:
            _ready("redis", describe_redis(s) if s.redis_sentinels else redact_url(redis_url))
        for name in ("executor", "api", "worker", "scheduler", "dashboard"):
            start(name, [*me, name])
        # Celery producers' messages, unless a legacy Celery deployment consumes those queues
        ingress = bool(s.celery_wire_queues and not s.legacy_broker_url)
        if ingress:
            start("celery-ingress", [*me, "celery-ingress"])
        details = {
            "executor": executor, "api": api, "dashboard": dashboard,
            "worker": f"{_processes(s.worker_processes)} x {s.worker_threads} threads",
            "scheduler": "cleanup and DLQ monitor on their cron schedules",
            "celery-ingress": f"queues {', '.join(s.celery_wire_queues)}",
        }  # fmt: skip
        try:
            asked = readiness.Stack(api, dashboard, executor, admin_key, ingress)
            problem = wait_ready(children, asked, stopping, lambda name: _ready(name, details[name]))
        except readiness.Interrupted:
            print("crucible up: stopped while starting.", file=sys.stderr, flush=True)
            return 130
        if problem:
            _fail(problem, logs)
            return 1
        stack = RunningStack(os.getpid(), redis_url, s.namespace, api, dashboard, executor)
        running_stack.record(s, stack)
        shown = None
        if getattr(args, "ha", False):  # this process's settings name no Sentinels: its children's do
            data = s.data_dir / "valkey-ha"
            shown = f"Sentinels {env['REDIS_SENTINELS']} (master {ha.MASTER!r}, data in {data})"
        print(_banner(s, stack, admin_key, logs, shown), flush=True)
        return _watch(children, spawn, stopping, logs)
    finally:
        running_stack.forget(s)
        _stop_children(children)


def _log_folder(s: Settings) -> Path | None:
    """Where the pieces' logs go, or None when `up` shows them on its own output."""
    if s.up_logs == "show":
        return None
    folder = s.data_dir / LOGS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _ready(name: str, detail: str) -> None:
    """One piece's line: it answers, and where."""
    print(f"  {_mark()} {LABELS.get(name, name):<16}{detail}", flush=True)


def _mark() -> str:
    """A check mark, unless our output's encoding has none."""
    try:
        "✓".encode(sys.stdout.encoding or "ascii")
    except (UnicodeEncodeError, LookupError):
        return "+"
    return "✓"


def _processes(count: int) -> str:
    return f"{count} process" if count == 1 else f"{count} processes"


def _fail(problem: Problem, logs: Path | None) -> None:
    """Why `up` stops while starting, with what the pieces concerned said last."""
    where = "" if logs is not None else ": see the pieces' lines above"
    print(f"crucible up: {problem.line}{where}; stopping.", file=sys.stderr, flush=True)
    _show_tails(problem.pieces, logs)


def _show_tails(pieces: tuple[str, ...], logs: Path | None) -> None:
    """The last lines of each piece's log file, when its lines were not shown already."""
    if logs is None:
        return
    for name in pieces:
        path = logs / f"{name}.log"
        lines = _tail(path)
        print(f"  the last lines of {path}:" if lines else f"  ({path} is empty)", file=sys.stderr)
        for line in lines:
            print(f"    {line}", file=sys.stderr)
    sys.stderr.flush()


def _tail(path: Path, count: int = TAIL_LINES) -> list[str]:
    try:
        with open(path, "rb") as log:
            log.seek(max(0, log.seek(0, os.SEEK_END) - 64 * 1024))
            data = log.read()
    except OSError:
        return []
    return data.decode(errors="replace").splitlines()[-count:]


def _free_ports(count: int, taken: set[int]) -> list[int]:
    """`count` free ports, none of `taken` (which grows by them)."""
    ports = []
    while len(ports) < count:
        port = free_port()
        if port not in taken:
            taken.add(port)
            ports.append(port)
    return ports


def _wait_tcp(port: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.1)
    return False


def _banner(
    s: Settings, stack: RunningStack, admin_key: str, logs: Path | None, redis_shown: str | None = None
) -> str:
    """Where each piece answers, where their logs are, and the admin key to use; `redis_shown`:
    the Redis `up --ha` started."""
    embedded = s.redis_url is None and not s.redis_sentinels and redis_shown is None
    redis_shown = redis_shown or (describe_redis(s) if s.redis_sentinels else redact_url(stack.redis_url))
    return (
        "\nCrucible is up:\n"
        f"  API        {stack.api_url}  (POST /api/eval)\n"
        f"  dashboard  {stack.dashboard_url}  (also {stack.api_url}/dashboard)\n"
        f"  executor   {stack.executor_url}\n"
        f"  workers    {_processes(s.worker_processes)} x {s.worker_threads} threads\n"
        f"  scheduler  cleanup '{s.cleanup_cron}', DLQ monitor '{s.dlq_monitor_cron}'\n"
        f"  redis      {redis_shown}"
        + (f"  (embedded, data in {s.data_dir / 'valkey'})" if embedded else "")
        + f"\n  admin key  {admin_key}  (kept in {s.data_dir / 'admin.key'})\n"
        + "             (as 'Authorization: Bearer <key>' or 'X-API-Key'; the dashboard asks for it)\n"
        + (f"  logs       {logs}/<piece>.log  (CRUCIBLE_UP_LOGS=show prints them here)\n" if logs else "")
        + "`crucible keys|submit|migration` run from this folder use this stack.\n"
        + "Press Ctrl-C to stop.\n"
    )


def _watch(children: Children, spawn: Spawn, stopping: threading.Event, logs: Path | None) -> int:
    """Start again a piece that exits, until Ctrl-C (0) or a piece keeps exiting (1); what it
    said last is shown each time."""
    restarts = RestartBudget()
    while not stopping.wait(0.2):
        for index, (name, process) in enumerate(children):
            if process.poll() is None:
                continue
            # A worker process killed by the OOM killer takes its whole `crucible worker`
            # down (Dramatiq stops the rest): start it again; its runs come back by heartbeat.
            if not restarts.allow(name):
                print(f"{name} keeps exiting (code {process.returncode}); stopping.", flush=True)
                _show_tails((name,), logs)
                return 1
            print(f"{name} exited (code {process.returncode}); starting it again.", flush=True)
            _show_tails((name,), logs)
            children[index] = (name, spawn(name))
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
