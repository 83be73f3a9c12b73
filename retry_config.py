"""The Celery worker service's `retry_config` module: the very objects our Backoff middleware uses."""

from app.celery_compat import DeadLetterQueue
from middleware.retry_policy import (
    RETRY_POLICIES,
    RetryStrategy,
    calculate_retry_delay,
    get_retry_message,
    should_retry_http_error,
)

__all__ = [
    "RETRY_POLICIES",
    "DeadLetterQueue",
    "RetryStrategy",
    "calculate_retry_delay",
    "get_retry_message",
    "should_retry_http_error",
]
