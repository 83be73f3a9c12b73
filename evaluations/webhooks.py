"""Webhooks: a submission's `callback_url` is POSTed the evaluation's final result, signed.

The signature is Stripe's and GitHub's scheme: `Crucible-Signature: t=<unix seconds>,v1=<hex
HMAC-SHA256 of "<t>.<body>" under the submitting key's webhook secret>`. A receiver recomputes it
over the raw body, compares in constant time and refuses an old `t` (a replay). Each delivery
carries `Crucible-Delivery`, the same for every attempt of one evaluation's result: a receiver
that saw it already can answer 2xx and do nothing (deliveries are at least once).
"""

from __future__ import annotations

import hashlib
import hmac
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx

from evaluations.errors import InvalidInput

SIGNATURE_HEADER = "Crucible-Signature"
DELIVERY_HEADER = "Crucible-Delivery"
EVENT_HEADER = "Crucible-Event"
EVENT = "evaluation.finished"
#: Headers a submission may ask its webhook to carry (its receiver's own credentials).
CALLBACK_HEADERS = ("authorization", "x-api-key", "x-auth-token", "x-request-id", "x-correlation-id")
MAX_CALLBACK_HEADERS = 5
MAX_URL_CHARS = 2048
MAX_HEADER_VALUE_CHARS = 1024
#: What one delivery attempt ends as (counted in /metrics as `crucible_callbacks_total`):
#: taken, refused as unreachable, failed with retries left, failed for good (dead-lettered).
CALLBACK_OUTCOMES = ("delivered", "refused", "retrying", "failed")
#: A receiver should refuse a signature older than this (seconds): README's snippet does.
TOLERANCE_S = 300


@dataclass(frozen=True)
class Callback:
    """Where a submission's result goes, and the headers it asked for."""

    url: str
    headers: dict[str, str] = field(default_factory=dict)


def parse_callback(body: dict[str, Any]) -> Callback | None:
    """`callback_url` and `callback_headers` of a submission, checked for their form (whether
    the host may be reached is `infra.outbound`'s question); None when there is no callback."""
    url = body.get("callback_url")
    headers = body.get("callback_headers")
    if url is None:
        if headers is not None:
            raise InvalidInput("field 'callback_headers' needs a 'callback_url'", field="callback_headers")
        return None
    if not isinstance(url, str) or not url:
        raise InvalidInput("field 'callback_url' must be an http or https URL", field="callback_url")
    if len(url) > MAX_URL_CHARS:
        raise InvalidInput(f"field 'callback_url' is over {MAX_URL_CHARS} characters", field="callback_url")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (a port that is not a number raises here)
    except ValueError as exc:
        raise InvalidInput(f"field 'callback_url' is not a URL: {exc}", field="callback_url") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidInput(
            "field 'callback_url' must be an http or https URL with a host", field="callback_url"
        )
    if parts.username is not None or parts.password is not None:
        raise InvalidInput(
            "field 'callback_url' must not carry credentials; send them in 'callback_headers'",
            field="callback_url",
        )
    if not url.isascii() or not url.isprintable() or " " in url:
        raise InvalidInput(
            "field 'callback_url' must be ASCII without spaces or control characters (IDNA-encode a "
            "non-ASCII host)",
            field="callback_url",
        )
    try:  # what the sender will parse: a URL only it refuses would fail every delivery
        httpx.URL(url)
    except (httpx.InvalidURL, ValueError) as exc:
        raise InvalidInput(f"field 'callback_url' is not a URL: {exc}", field="callback_url") from None
    return Callback(url, parse_headers(headers))


def parse_headers(headers: Any) -> dict[str, str]:
    if headers is None:
        return {}
    if not isinstance(headers, dict) or len(headers) > MAX_CALLBACK_HEADERS:
        raise InvalidInput(
            f"field 'callback_headers' must be an object of at most {MAX_CALLBACK_HEADERS} headers",
            field="callback_headers",
        )
    checked = {}
    for name, value in headers.items():
        if name.lower() not in CALLBACK_HEADERS:
            raise InvalidInput(
                f"callback header {name[:64]!r} is not allowed; allowed: {', '.join(CALLBACK_HEADERS)}",
                field="callback_headers",
            )
        if (
            not isinstance(value, str)
            or len(value) > MAX_HEADER_VALUE_CHARS
            or not value.isascii()
            or not value.isprintable()
        ):
            raise InvalidInput(
                f"callback header {name!r} must be printable ASCII of at most {MAX_HEADER_VALUE_CHARS} "
                "characters",
                field="callback_headers",
            )
        checked[name.lower()] = value
    return checked


def signature(secret: str, body: bytes, at: int | None = None) -> str:
    """The `Crucible-Signature` header's value for `body` sent at `at` (unix seconds)."""
    stamp = int(time.time()) if at is None else at
    mac = hmac.new(secret.encode(), f"{stamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={stamp},v1={mac}"


def verify(secret: str, body: bytes, header: str, tolerance_s: float = TOLERANCE_S) -> bool:
    """Whether `header` signs `body` under `secret`, made within `tolerance_s` (what a receiver
    does; README shows the same in a few lines)."""
    parts = dict(item.split("=", 1) for item in header.split(",") if "=" in item)
    try:
        stamp = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs(time.time() - stamp) > tolerance_s:
        return False
    expected = signature(secret, body, stamp).split("v1=", 1)[1]
    return hmac.compare_digest(expected, parts.get("v1", ""))


def delivery_id(eval_id: str, final_at_ms: int) -> str:
    """The idempotency id of the webhook for `eval_id`'s result that came at `final_at_ms`."""
    return f"{eval_id}.{final_at_ms}"
