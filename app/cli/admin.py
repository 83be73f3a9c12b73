"""Operator commands against a deployment's Redis: `crucible keys` and `crucible migration`.

They change shared state (API keys, the Celery/Dramatiq split) that every API process reads,
then exit; `ensure_admin_key` is the same key store, used by `crucible up` in development.
"""

from __future__ import annotations

import argparse
import sys

from evaluations.settings import Settings, get_settings


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
