"""The `crucible` command: its argument parser and `main`, the installed entry point.

Each command's work lives in a module of its own (`serve`: the long-running services,
`supervisor`: `crucible up`, `admin`: keys and migration, `submit`); this module only parses
and dispatches, so `crucible --help` stays quick.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from app.cli.admin import run_keys, run_migration
from app.cli.serve import (
    run_api,
    run_celery_ingress,
    run_dashboard,
    run_embedded_redis,
    run_executor,
    run_scheduler,
    run_worker,
)
from app.cli.supervisor import run_up
from evaluations.settings import ConfigError

#: The description `crucible --help` prints.
DESCRIPTION = "The `crucible` command: run the whole stack (`up`) or one piece of it."


def run_submit(args: argparse.Namespace) -> int:
    import asyncio

    from app.cli.submit import SubmitError, run

    try:
        return asyncio.run(run(args))
    except SubmitError as exc:
        print(f"crucible submit: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ncrucible submit: stopped waiting; what was submitted still runs", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crucible", description=DESCRIPTION)
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
    commands.add_parser(
        "celery-ingress", help="run Celery producers' task messages (CELERY_WIRE_QUEUES) as evaluations"
    )
    redis_cmd = commands.add_parser("embedded-redis", help="run an embedded Valkey in the foreground")
    redis_cmd.add_argument("--port", type=int, default=6399)
    from app.cli.submit import add_arguments
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


HANDLERS = {
    "migration": run_migration,
    "up": run_up,
    "api": run_api,
    "worker": run_worker,
    "executor": run_executor,
    "scheduler": run_scheduler,
    "dashboard": run_dashboard,
    "celery-ingress": run_celery_ingress,
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
