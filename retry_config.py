"""The Celery worker service's `retry_config` module: the objects our Backoff middleware uses,
over the policies this process's settings give (`CRUCIBLE_RETRY_POLICIES` merged into the
built-in table: `default`, `network_error`, `aggressive`, `conservative`, `quota_exceeded`),
read when first asked for, never at import."""

from __future__ import annotations

from typing import Any

from app.celery.shim import DeadLetterQueue
from evaluations.retry_policies import Policies
from infra.settings import get_settings
from middleware import retry_policy
from middleware.retry_policy import (
    NON_RETRYABLE_HTTP_CODES,
    RETRYABLE_HTTP_CODES,
    get_retry_message,
    should_retry_http_error,
)

__all__ = [
    "NON_RETRYABLE_HTTP_CODES",
    "RETRYABLE_HTTP_CODES",
    "RETRY_POLICIES",  # noqa: F822 (given by the module's __getattr__)
    "DeadLetterQueue",
    "RetryStrategy",
    "calculate_retry_delay",
    "get_retry_message",
    "should_retry_http_error",
]


def _policies() -> Policies:
    return get_settings().retry_policies


def calculate_retry_delay(retry_count: int, policy: str = "default", add_jitter: bool | None = None) -> float:
    """The original's signature, under this process's policies."""
    return retry_policy.calculate_retry_delay(retry_count, policy, add_jitter, policies=_policies())


class RetryStrategy(retry_policy.RetryStrategy):
    """The original's signature, under this process's policies."""

    def __init__(self, policy: str = "default") -> None:
        super().__init__(policy, _policies())


def __getattr__(name: str) -> Any:
    """`RETRY_POLICIES`: the table this process's workers use, as a worker started with the
    same environment does."""
    if name == "RETRY_POLICIES":
        return _policies()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
