"""A submission's webhook fields and the signature its deliveries carry (evaluations/webhooks.py)."""

from __future__ import annotations

import time

import pytest

from evaluations.errors import InvalidInput
from evaluations.webhooks import Callback, parse_callback, signature, verify


def test_a_callback_is_read_with_its_allowed_headers() -> None:
    body = {
        "callback_url": "https://hooks.example.com/x?y=1",
        "callback_headers": {"Authorization": "Bearer t"},
    }
    assert parse_callback(body) == Callback("https://hooks.example.com/x?y=1", {"authorization": "Bearer t"})
    assert parse_callback({}) is None


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"callback_url": "ftp://example.com/x"}, "callback_url"),
        ({"callback_url": "https://"}, "callback_url"),
        ({"callback_url": "https://user:pw@example.com/"}, "callback_url"),
        ({"callback_url": "https://example.com:99999/"}, "callback_url"),
        ({"callback_url": "https://example.com/a b"}, "callback_url"),
        ({"callback_url": 7}, "callback_url"),
        ({"callback_url": "https://example.com/" + "a" * 2048}, "callback_url"),
        ({"callback_headers": {"authorization": "x"}}, "callback_headers"),
        ({"callback_url": "https://example.com/", "callback_headers": {"Host": "evil"}}, "callback_headers"),
        (
            {"callback_url": "https://example.com/", "callback_headers": {"X-Api-Key": "a\r\nb"}},
            "callback_headers",
        ),
        ({"callback_url": "https://example.com/", "callback_headers": ["x"]}, "callback_headers"),
        (
            {"callback_url": "https://example.com/", "callback_headers": {"X-Request-Id": "café"}},
            "callback_headers",
        ),
        (
            {"callback_url": "https://example.com/", "callback_headers": {"X-Request-Id": "a\x7fb"}},
            "callback_headers",
        ),
        ({"callback_url": "http://[v1.evil.example]/"}, "callback_url"),
        ({"callback_url": "http://exämple.com/"}, "callback_url"),
    ],
)
def test_a_callback_that_cannot_be_used_is_refused_naming_its_field(body: dict, field: str) -> None:
    with pytest.raises(InvalidInput) as refused:
        parse_callback(body)
    assert refused.value.details["field"] == field


def test_a_signature_verifies_only_its_own_body_secret_and_recent_time() -> None:
    body = b'{"eval_id": "e1", "status": "completed"}'
    header = signature("whsec_a", body)
    assert verify("whsec_a", body, header)
    assert not verify("whsec_b", body, header)
    assert not verify("whsec_a", body + b" ", header)
    old = signature("whsec_a", body, at=int(time.time()) - 3600)
    assert not verify("whsec_a", body, old)
    assert not verify("whsec_a", body, "v1=deadbeef")
