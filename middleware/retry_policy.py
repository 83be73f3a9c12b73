"""Retry policies of the Celery service, kept to the letter, and which failure takes which.

The seed README is the spec: delay of retry n (0-based) = min(max_delay, base · exp^n),
jitter adds up to 25 % of that delay and never goes past max_delay. The `retry_config`
compatibility module re-exports these very objects.
"""

from __future__ import annotations

import json
import random
from typing import Any

import httpx
import redis

RETRY_POLICIES: dict[str, dict[str, Any]] = {
    "default": {
        "max_retries": 3,
        "base_delay": 5,
        "exponential_base": 2,
        "max_delay": 300,
        "jitter": True,
    },
    "network_error": {
        "max_retries": 5,
        "base_delay": 10,
        "exponential_base": 1.5,
        "max_delay": 600,
    },
}

#: Jitter adds up to this share of the computed delay.
JITTER_SHARE = 0.25

RETRYABLE_HTTP = {408: "request timeout", 429: "rate limited", 500: "server error",
                  502: "bad gateway", 503: "service unavailable", 504: "gateway timeout"}  # fmt: skip
NOT_RETRYABLE_HTTP = {400, 401, 403, 404, 405, 406, 409, 410, 422}


def apply_overrides(raw: str | None) -> None:
    """Merge `CRUCIBLE_RETRY_POLICIES` (JSON: {"default": {"max_retries": 5}, ...}) in place."""
    if not raw:
        return
    try:
        overrides = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"CRUCIBLE_RETRY_POLICIES is not JSON: {exc}") from None
    if not isinstance(overrides, dict):
        raise ValueError("CRUCIBLE_RETRY_POLICIES must be a JSON object of policies")
    for name, values in overrides.items():
        if not isinstance(values, dict):
            raise ValueError(f"CRUCIBLE_RETRY_POLICIES[{name!r}] must be an object")
        unknown = set(values) - set(RETRY_POLICIES["default"])
        if unknown:
            raise ValueError(f"CRUCIBLE_RETRY_POLICIES[{name!r}] has unknown keys {sorted(unknown)}")
        RETRY_POLICIES.setdefault(name, dict(RETRY_POLICIES["default"])).update(values)


def calculate_retry_delay(retry_count: int, policy: str = "default", add_jitter: bool | None = None) -> float:
    """Seconds to wait before retry `retry_count` (0-based) under `policy`."""
    p = RETRY_POLICIES[policy]
    delay = min(p["max_delay"], p["base_delay"] * p["exponential_base"] ** retry_count)
    if p.get("jitter", False) if add_jitter is None else add_jitter:  # the seed's network_error has none
        delay = min(p["max_delay"], delay + random.uniform(0, JITTER_SHARE * delay))
    return float(delay)


def should_retry_http_error(status_code: int) -> tuple[bool, str]:
    """Whether an HTTP status from a service is worth retrying, and why."""
    if status_code in RETRYABLE_HTTP:
        return True, f"HTTP {status_code} ({RETRYABLE_HTTP[status_code]}) is transient"
    if status_code in NOT_RETRYABLE_HTTP or 400 <= status_code < 500:
        return False, f"HTTP {status_code} is a client error; retrying cannot help"
    return False, f"HTTP {status_code} is not retried"


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

    def __init__(self, policy: str = "default") -> None:
        if policy not in RETRY_POLICIES:
            raise ValueError(f"unknown retry policy {policy!r}; known: {sorted(RETRY_POLICIES)}")
        self.policy = policy

    @property
    def max_retries(self) -> int:
        return int(RETRY_POLICIES[self.policy]["max_retries"])

    def should_retry(self, exc: BaseException, retry_count: int) -> bool:
        return policy_for(exc) is not None and retry_count < self.max_retries

    def get_retry_delay(self, retry_count: int) -> float:
        return calculate_retry_delay(retry_count, self.policy)


def get_retry_message(
    task: str, eval_id: str | None, reason: str, retry_count: int, max_retries: int, delay: float
) -> str:
    """The log line the Celery service wrote for each retry."""
    return (
        f"Task {task} for evaluation {eval_id} failed: {reason}. "
        f"Retry {retry_count + 1}/{max_retries} in {delay:.1f}s"
    )
