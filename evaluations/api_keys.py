"""API keys: created once (shown once), stored hashed in Redis, with a tier each.

A key looks like `cru_<id>_<secret>`; Redis holds only the SHA-256 of the whole key (keys
are 256-bit random, so a fast hash is enough: there is nothing to brute-force) and the key's
public record (id, name, tier, times). Revoking deletes the hash, so the key stops working
at once in every API process.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from dataclasses import asdict, dataclass

import redis.asyncio as aioredis

from evaluations.redis_keys import RedisKeys

TIERS = ("standard", "premium", "admin")
#: Tiers whose `priority: true` submissions go to the high queue.
PRIORITY_TIERS = ("premium", "admin")


class InvalidKeyRequest(ValueError):
    """A key operation that cannot be done (unknown tier, unknown id)."""


@dataclass(frozen=True)
class ApiKey:
    id: str
    name: str
    tier: str
    created_ms: int
    revoked_ms: int | None = None

    @property
    def is_admin(self) -> bool:
        return self.tier == "admin"


#: The key `CRUCIBLE_ADMIN_KEY` stands for (it has no record).
ENV_ADMIN = ApiKey("env-admin", "CRUCIBLE_ADMIN_KEY", "admin", 0)


def new_webhook_secret() -> str:
    return f"whsec_{secrets.token_urlsafe(32)}"


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyStore:
    def __init__(self, client: aioredis.Redis, namespace: str) -> None:
        self.client = client
        self.records = RedisKeys(namespace).api_keys
        self.hashes = RedisKeys(namespace).api_key_hashes
        self.webhook_secrets = RedisKeys(namespace).webhook_secrets

    async def webhook_secret(self, key_id: str) -> str:
        """The secret `key_id`'s webhooks are signed with, made on first use."""
        await self.client.hsetnx(self.webhook_secrets, key_id, new_webhook_secret())
        return str(await self.client.hget(self.webhook_secrets, key_id))

    async def rotate_webhook_secret(self, key_id: str) -> str:
        """A new secret for `key_id`'s webhooks; deliveries from now on are signed with it."""
        secret = new_webhook_secret()
        await self.client.hset(self.webhook_secrets, key_id, secret)
        return secret

    async def create(self, name: str, tier: str) -> tuple[ApiKey, str]:
        """A new key and its secret form, which is not stored and cannot be shown again."""
        if tier not in TIERS:
            raise InvalidKeyRequest(f"unknown tier {tier!r}; tiers: {', '.join(TIERS)}")
        while True:
            key_id = secrets.token_hex(8)
            record = ApiKey(key_id, name, tier, int(time.time() * 1000))
            if await self.client.hsetnx(self.records, key_id, json.dumps(asdict(record))):
                break  # a fresh id (a clash of 64 random bits would just draw again)
        secret = f"cru_{key_id}_{secrets.token_urlsafe(32)}"
        await self.client.hset(self.hashes, digest(secret), key_id)
        return record, secret

    async def lookup(self, secret: str) -> ApiKey | None:
        """The live key this secret belongs to, or None."""
        key_id = await self.client.hget(self.hashes, digest(secret))
        if key_id is None:
            return None
        raw = await self.client.hget(self.records, key_id)
        record = ApiKey(**json.loads(raw)) if raw else None
        return record if record and record.revoked_ms is None else None

    async def get(self, key_id: str) -> ApiKey | None:
        """The key with this id (revoked or not): the environment's admin key included."""
        if key_id == ENV_ADMIN.id:
            return ENV_ADMIN
        raw = await self.client.hget(self.records, key_id)
        return ApiKey(**json.loads(raw)) if raw else None

    async def list(self) -> list[ApiKey]:
        records = [ApiKey(**json.loads(raw)) for raw in (await self.client.hgetall(self.records)).values()]
        return sorted(records, key=lambda k: k.created_ms)

    async def revoke(self, key_id: str) -> ApiKey:
        raw = await self.client.hget(self.records, key_id)
        if raw is None:
            raise InvalidKeyRequest(f"no key with id {key_id!r}")
        known = ApiKey(**json.loads(raw))
        if known.revoked_ms:  # revoked before: it stays revoked since then
            return known
        record = ApiKey(**{**json.loads(raw), "revoked_ms": int(time.time() * 1000)})
        stale = [h for h, k in (await self.client.hgetall(self.hashes)).items() if k == key_id]
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.hset(self.records, key_id, json.dumps(asdict(record)))
            if stale:
                pipe.hdel(self.hashes, *stale)
            await pipe.execute()
        return record
