"""Retry policies of the Celery service, kept to the letter, and which failure takes which.
The tables themselves are data in `evaluations.retry_policies`.

The seed README is the spec: delay of retry n (0-based) = min(max_delay, base · exp^n),
jitter adds up to 25 % of that delay and never goes past max_delay. The `retry_config`
compatibility module re-exports these very objects.
"""

from __future__ import annotations

import random
from typing import Any

import httpx
import redis

from evaluations.retry_policies import RETRY_POLICIES, Policies

#: Jitter adds up to this share of the computed delay.
JITTER_SHARE = 0.25

#: The original module's two tables, by name and with its phrases (callers import them).
RETRYABLE_HTTP_CODES = {408: "Request Timeout", 429: "Too Many Requests", 500: "Internal Server Error",
                        502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}  # fmt: skip
NON_RETRYABLE_HTTP_CODES = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
                            405: "Method Not Allowed", 406: "Not Acceptable", 409: "Conflict", 410: "Gone",
                            422: "Unprocessable Entity"}  # fmt: skip
#: What the original `RetryStrategy` retries an exception without an HTTP status for.
TRANSIENT_WORDS = ("connection", "timeout", "refused")


def calculate_retry_delay(
    retry_count: int,
    policy: str = "default",
    add_jitter: bool | None = None,
    policies: Policies = RETRY_POLICIES,
) -> float:
    """Seconds to wait before retry `retry_count` (0-based) under `policy` of `policies`."""
    p = policies[policy]
    delay = min(p["max_delay"], p["base_delay"] * p["exponential_base"] ** retry_count)
    if p.get("jitter", False) if add_jitter is None else add_jitter:  # the seed's network_error has none
        delay = min(p["max_delay"], delay + random.uniform(0, JITTER_SHARE * delay))
    return float(delay)


def should_retry_http_error(status_code: int) -> tuple[bool, str]:
    """Whether an HTTP status from a service is worth retrying, and its phrase, as the original
    module answers: its two tables, then any other 5xx is retried ("Server Error") and
    anything else is not ("Unknown Error")."""
    if status_code in RETRYABLE_HTTP_CODES:
        return True, RETRYABLE_HTTP_CODES[status_code]
    if status_code in NON_RETRYABLE_HTTP_CODES:
        return False, NON_RETRYABLE_HTTP_CODES[status_code]
    if 500 <= status_code < 600:
        return True, "Server Error"
    return False, "Unknown Error"


def policy_for(exc: BaseException) -> str | None:
    """The policy a failure takes, or None when it must not be retried.

    Connection errors and time-outs reaching a service → `network_error`; an HTTP status
    carried by the exception (attribute `status`) decides by the contract's lists; 429 takes
    the gentler `network_error`; anything else unexpected → `default`.
    """
    if isinstance(exc, httpx.TransportError | redis.ConnectionError | redis.TimeoutError | ConnectionError):
        return "network_error"
    status = getattr(exc, "status", None)
    if isinstance(exc, httpx.HTTPStatusError):
        status = exc.response.status_code
    if isinstance(status, int):
        retry, _ = should_retry_http_error(status)
        if not retry:
            return None
        return "network_error" if status == 429 else "default"
    if getattr(exc, "retryable", True) is False:
        return None
    return "default"


class RetryStrategy:
    """The contract's object form: one policy, asked per failure."""

    def __init__(self, policy: str = "default", policies: Policies = RETRY_POLICIES) -> None:
        if policy not in policies:
            raise ValueError(f"unknown retry policy {policy!r}; known: {sorted(policies)}")
        self.policy = policy
        self.policies = policies

    @property
    def config(self) -> dict[str, Any]:
        """The policy's values (`max_retries`, `base_delay`, ...), overrides merged in."""
        return self.policies[self.policy]

    @property
    def max_retries(self) -> int:
        return int(self.config["max_retries"])

    def should_retry(self, exc: BaseException, retry_count: int) -> bool:
        """The original's rule: never past `max_retries`; an exception carrying an HTTP
        response (`exc.response.status_code`, or our clients' `exc.status`) by its status;
        any other when its message speaks of a connection, a time-out or a refusal."""
        if retry_count >= self.max_retries:
            return False
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if not isinstance(status, int):
            status = getattr(exc, "status", None)
        if isinstance(status, int):
            return should_retry_http_error(status)[0]
        message = str(exc).lower()
        return any(word in message for word in TRANSIENT_WORDS)

    def get_retry_delay(self, retry_count: int) -> float:
        return calculate_retry_delay(retry_count, self.policy, policies=self.policies)


def get_retry_message(
    task_name: str, eval_id: str | None, retry_count: int, max_retries: int, delay: float, reason: str
) -> str:
    """The log line the Celery service wrote for each retry (the original's argument order)."""
    return (
        f"Task {task_name} for evaluation {eval_id} failed: {reason}. "
        f"Retry {retry_count + 1}/{max_retries} in {delay:.1f}s"
    )
