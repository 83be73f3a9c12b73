"""The async services one process needs, built one way for the API and the Celery shim."""

from __future__ import annotations

from dataclasses import dataclass

import httpx
import redis.asyncio as aioredis

from actors.broker import AsyncEnqueuer
from actors.dlq import AsyncDeadLetterQueue
from actors.executor_client import ExecutorPool
from app.api.event_streams import EventStreams
from app.cancellation import Canceller
from app.migration.control import MigrationControl
from app.migration.legacy import LegacyCelery
from app.migration.route import LegacyRoute
from app.submission import Submitter
from evaluations.api_keys import KeyStore
from evaluations.quotas import RateLimiter
from evaluations.store import EvaluationStore, StatusForwarder
from infra.outbound import AddressPolicy
from infra.redis_client import async_client_for
from infra.redis_memory import MemoryGuard, Shedding
from infra.settings import Settings


@dataclass
class Services:
    settings: Settings
    client: aioredis.Redis
    http: httpx.AsyncClient
    store: EvaluationStore
    streams: EventStreams
    enqueuer: AsyncEnqueuer
    submitter: Submitter
    canceller: Canceller
    dlq: AsyncDeadLetterQueue
    control: MigrationControl
    legacy: LegacyCelery | None
    #: how submissions reach the legacy deployment, where one is configured
    legacy_route: LegacyRoute | None
    keys: KeyStore
    limiter: RateLimiter
    executors: ExecutorPool

    @classmethod
    def build(cls, settings: Settings) -> Services:
        """Call on the event loop that will use them (Redis pools bind to it)."""
        client = async_client_for(settings)
        http = httpx.AsyncClient()
        forwarder = StatusForwarder(settings.storage_url, http) if settings.storage_url else None
        store = EvaluationStore(
            client, settings.namespace, retention_seconds=settings.retention_seconds, forwarder=forwarder
        )
        legacy = None
        if settings.legacy_broker_url:
            legacy = LegacyCelery(
                settings.legacy_broker_url, settings.legacy_backend_url or "", settings.legacy_key_prefix
            )
        control = MigrationControl(client, settings, legacy_configured=legacy is not None)
        route = LegacyRoute(legacy, control) if legacy else None
        enqueuer = AsyncEnqueuer(client, settings.namespace)
        executors = ExecutorPool(settings.executor_urls, settings.executor_secret)
        limiter = RateLimiter(client, settings.namespace, settings.rate_limits)
        return cls(
            settings=settings,
            client=client,
            http=http,
            store=store,
            streams=EventStreams(client, store),
            enqueuer=enqueuer,
            submitter=Submitter(
                client,
                store,
                route=route,
                limiter=limiter,
                memory=MemoryGuard(
                    client,
                    settings.redis_full_share,
                    Shedding(
                        store, settings.redis_shed_share, settings.min_retention_s, settings.shed_output_bytes
                    ),
                ),
                outbound=AddressPolicy(settings.webhook_allow_hosts),
                min_replicas=settings.redis_min_replicas,
                wait_ms=settings.redis_wait_ms,
            ),
            canceller=Canceller(client, store, enqueuer, executors, legacy=legacy),
            dlq=AsyncDeadLetterQueue(client, settings.namespace, store),
            control=control,
            legacy=legacy,
            legacy_route=route,
            keys=KeyStore(client, settings.namespace),
            limiter=limiter,
            executors=executors,
        )

    async def close(self) -> None:
        await self.streams.close()
        await self.http.aclose()
        await self.executors.close()
        await self.client.aclose()
        if self.legacy:
            await self.legacy.close()
