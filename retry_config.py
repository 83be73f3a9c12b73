"""The Celery worker service's `retry_config` module: the very objects our Backoff middleware uses."""

from app.celery.shim import DeadLetterQueue
from middleware.retry_policy import (
    NON_RETRYABLE_HTTP_CODES,
    RETRY_POLICIES,
    RETRYABLE_HTTP_CODES,
    RetryStrategy,
    calculate_retry_delay,
    get_retry_message,
    should_retry_http_error,
)

__all__ = [
    "NON_RETRYABLE_HTTP_CODES",
    "RETRYABLE_HTTP_CODES",
    "RETRY_POLICIES",
    "DeadLetterQueue",
    "RetryStrategy",
    "calculate_retry_delay",
    "get_retry_message",
    "should_retry_http_error",
]
