"""The async services, callable from synchronous code (the Celery shim, the DLQ class).

Celery-era callers are synchronous and may even call from inside a running event loop.
Each process gets one background event loop (anyio's blocking portal) holding one set of
`Services` per Redis URL and namespace; calls block the caller until the coroutine is done,
as Celery's own calls do. A forked child builds its own, since threads do not survive fork.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import threading
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from typing import TypeVar

from anyio.from_thread import BlockingPortal, start_blocking_portal

from app.services import Services
from infra.settings import Settings, get_settings

T = TypeVar("T")


class BlockingServices:
    """Services on a background loop; `call(lambda s: s.store.get(...))` runs one coroutine."""

    def __init__(self, redis_url: str | None = None, namespace: str | None = None) -> None:
        settings = get_settings()
        self.settings = dataclasses.replace(
            settings, redis_url=redis_url or settings.redis_url, namespace=namespace or settings.namespace
        )
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._portal_cm: AbstractContextManager[BlockingPortal] | None = None
        self._portal: BlockingPortal | None = None
        self._services: Services | None = None

    def call(self, fn: Callable[[Services], Awaitable[T]]) -> T:
        portal, services = self._started()
        return portal.call(_await, fn, services)

    def _started(self) -> tuple[BlockingPortal, Services]:
        with self._lock:
            if self._pid != os.getpid() or self._portal is None or self._services is None:
                portal_cm = start_blocking_portal()
                portal = portal_cm.__enter__()
                try:
                    self._services = portal.call(_build, self.settings)
                except BaseException:
                    portal_cm.__exit__(None, None, None)  # no loop thread left behind
                    raise
                self._portal_cm, self._portal, self._pid = portal_cm, portal, os.getpid()
                atexit.register(self.close)
            return self._portal, self._services

    def close(self) -> None:
        with self._lock:
            if self._portal and self._services and self._portal_cm and self._pid == os.getpid():
                self._portal.call(self._services.close)
                self._portal_cm.__exit__(None, None, None)
            self._portal = self._services = self._portal_cm = None


async def _await(fn: Callable[[Services], Awaitable[T]], services: Services) -> T:
    return await fn(services)


async def _build(settings: Settings) -> Services:
    return Services.build(settings)


_shared: dict[tuple[str | None, str | None], BlockingServices] = {}
_shared_lock = threading.Lock()


def blocking_services(redis_url: str | None = None, namespace: str | None = None) -> BlockingServices:
    """The process's services for this Redis URL and namespace (the settings' when None)."""
    with _shared_lock:
        key = (redis_url, namespace)
        if key not in _shared:
            _shared[key] = BlockingServices(redis_url, namespace)
        return _shared[key]
