"""The `crucible` command: its argument parser and `main`, the installed entry point.

Each command's work lives in a module of its own (`serve`: the long-running services,
`supervisor`: `crucible up`, `admin`: keys and migration, `submit`); this module only parses
and dispatches, so `crucible --help` stays quick.
"""

from __future__ import annotations

import argparse
import difflib
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
from infra.settings import ConfigError

#: The description `crucible --help` prints.
DESCRIPTION = (
    "The `crucible` command: run the whole stack (`up`) or one piece of it, and manage it. In a "
    "checkout, `./dev <command>` runs it from the project's .venv, and `./dev test` runs the tests."
)


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
    up = commands.add_parser("up", help="run the whole stack (embedded Valkey unless REDIS_URL is set)")
    up.add_argument(
        "--ha",
        action="store_true",
        help="Redis as a primary, a replica and three Sentinels here (answers once a replica has it)",
    )
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

    add_arguments(
        commands.add_parser(
            "submit", help="submit files and wait for them, with a progress bar",
            epilog="Exit status: 0 when every file's evaluation completed, 1 when one was refused or "
            "did not complete, 2 for a usage error (a missing file, an unknown extension).",
        )
    )  # fmt: skip
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


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """The arguments; an option the command does not know is reported by that command's own
    parser (its usage, not the top-level one), with the option it most likely meant."""
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        command = parser
        for name in ("command", "action"):  # down to the subcommand that was given
            chosen = [a for a in command._actions if isinstance(a, argparse._SubParsersAction)]
            if chosen and getattr(args, name, None) in chosen[0].choices:
                command = chosen[0].choices[getattr(args, name)]
        known = [option for action in command._actions for option in action.option_strings]
        close = difflib.get_close_matches(unknown[0].split("=", 1)[0], known, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        command.error(f"unrecognized arguments: {' '.join(unknown)}{hint}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(build_parser(), argv)
    try:
        return HANDLERS[args.command](args)
    except ConfigError as exc:  # a setting it cannot use: say which, not a traceback
        print(f"crucible {args.command}: {exc}", file=sys.stderr)
        return 2
