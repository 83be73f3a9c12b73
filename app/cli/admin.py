"""Operator commands against a deployment's Redis: `crucible keys` and `crucible migration`.

They change shared state (API keys, the Celery/Dramatiq split) that every API process reads,
then exit. They work on REDIS_URL's Redis, else on the stack `crucible up` runs from this
folder (app/cli/running_stack.py); `ensure_admin_key` is the same key store, used by `crucible up`.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from app.cli.running_stack import admin_redis
from app.cli.tables import aligned
from infra.settings import ConfigError, Settings, get_settings

T = TypeVar("T")
#: How long a command waits to connect to Redis before it says it cannot.
CONNECT_TIMEOUT_S = 5.0


def on_admin_redis(command: str, act: Callable[[Any, str], Awaitable[T]]) -> T | None:
    """Run `act(client, namespace)` on the Redis this command works on; None, after one line
    on stderr, when that Redis does not answer."""
    from redis.exceptions import ConnectionError, TimeoutError

    from infra.redis_client import async_client, async_client_for, describe_redis, redact_url

    settings = get_settings()
    url, namespace = admin_redis(settings)
    shown = describe_redis(settings) if settings.redis_sentinels else redact_url(url)

    async def run() -> T:
        try:
            if settings.redis_sentinels:  # the master the Sentinels name
                client = async_client_for(settings, connect_timeout=CONNECT_TIMEOUT_S)
            else:
                password = settings.redis_password
                client = async_client(url, connect_timeout=CONNECT_TIMEOUT_S, password=password)
        except ValueError as exc:  # not a Redis URL at all
            raise ConfigError(f"REDIS_URL {redact_url(url)!r} is not a Redis URL: {exc}") from None
        try:
            return await act(client, namespace)
        finally:
            await client.aclose()

    try:
        return asyncio.run(run())
    except (ConnectionError, TimeoutError, OSError) as exc:
        print(f"crucible {command}: cannot reach Redis at {shown}: {exc}", file=sys.stderr)
        return None


def run_keys(args: argparse.Namespace) -> int:
    """`crucible keys create|list|revoke`: API keys in this deployment's Redis."""
    from evaluations.api_keys import InvalidKeyRequest, KeyStore

    async def act(client: Any, namespace: str) -> bool:
        keys = KeyStore(client, namespace)
        if args.action == "create":
            record, secret = await keys.create(args.name, args.tier)
            print(f"created key {record.id} ({record.tier}) for {record.name!r}; it is shown only now:")
            print(secret)
        elif args.action == "revoke":
            before = int(time.time() * 1000)
            record = await keys.revoke(args.key_id)
            if record.revoked_ms is not None and record.revoked_ms < before:
                since = when(record.revoked_ms)
                print(f"key {record.id} ({record.name!r}) was already revoked at {since} UTC")
            else:
                print(f"revoked key {record.id} ({record.name!r})")
        else:
            print(key_table(await keys.list()))
        return True

    try:
        return 0 if on_admin_redis("keys", act) else 1
    except InvalidKeyRequest as exc:
        print(f"crucible keys: {exc}", file=sys.stderr)
        return 2


def when(ms: int | None) -> str:
    """A key's time as `keys list` shows it (UTC, to the minute)."""
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M") if ms else "-"


def key_table(keys: list[Any]) -> str:
    """`crucible keys list`: one row per key."""
    rows = [("id", "tier", "created (UTC)", "revoked (UTC)", "name")]
    rows += [(k.id, k.tier, when(k.created_ms), when(k.revoked_ms), k.name) for k in keys]
    return aligned(rows)


def ensure_admin_key(redis_url: str, settings: Settings) -> str:
    """Development mode: make an admin key on first start, keep it in the data folder (0600),
    and return it so `crucible up` can print it. Later starts print the same key."""
    from evaluations.api_keys import KeyStore
    from infra.redis_client import async_client, async_client_for

    path = settings.data_dir / "admin.key"

    async def make() -> str:
        if settings.redis_sentinels:
            client = async_client_for(settings, connect_timeout=CONNECT_TIMEOUT_S)
        else:
            password = settings.redis_password
            client = async_client(redis_url, connect_timeout=CONNECT_TIMEOUT_S, password=password)
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


def run_migration(args: argparse.Namespace) -> int:
    """Print the migration report; `set`/`reset` change the split for every API process at once."""
    import dataclasses
    import json

    from app.migration.control import MigrationControl, migration_report
    from evaluations.store import EvaluationStore

    s = get_settings()
    if args.action == "set" and args.share is None and args.force_legacy is None and args.shadow is None:
        print("crucible migration: set what? give --share, --force-legacy or --shadow", file=sys.stderr)
        return 2

    async def act(client: Any, namespace: str) -> dict[str, object]:
        settings = dataclasses.replace(s, namespace=namespace)
        control = MigrationControl(client, settings, legacy_configured=s.legacy_broker_url is not None)
        if args.action == "reset":
            await control.reset()
        elif args.action == "set":
            force = None if args.force_legacy is None else args.force_legacy == "on"
            await control.set(dramatiq_share=args.share, force_legacy=force, shadow_rate=args.shadow)
        return await migration_report(control, EvaluationStore(client, namespace, retention_seconds=0))

    try:
        report = on_admin_redis("migration", act)
    except ValueError as exc:
        print(f"crucible migration: {exc}", file=sys.stderr)
        return 2
    if report is None:
        return 1
    print(json.dumps(report, indent=2))
    if args.action == "set" and s.legacy_broker_url is None:
        print("crucible migration: no legacy Celery deployment is configured (LEGACY_BROKER_URL is "
              "unset), so every submission still goes to Dramatiq, whatever the split says",
              file=sys.stderr)  # fmt: skip
    return 0
