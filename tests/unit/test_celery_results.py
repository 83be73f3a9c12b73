"""Where a Celery producer's result records go: `CELERY_RESULT_BACKEND` read and compared with
the broker's database (app/celery/results.py)."""

from __future__ import annotations

import pytest

from app.celery.results import backend_id, relayed_backend
from infra.settings import ConfigError, Settings


@pytest.mark.parametrize(
    ("backend", "relayed"),
    [
        (None, False),  # unset: written with each change, in Crucible's Redis
        ("redis://127.0.0.1:6379/0", False),  # the broker itself
        ("redis://localhost:6379", False),  # the broker, spelled another way
        ("redis://:secret@127.0.0.1:6379/0", False),  # with a password
        ("redis://127.0.0.1:6379/1", True),  # another database of the broker's server
        ("redis://10.0.0.7:6379/0", True),  # another Redis
        ("unix:///run/redis.sock?db=0", True),
    ],
)
def test_results_are_relayed_only_where_the_backend_is_not_the_brokers_database(
    monkeypatch: pytest.MonkeyPatch, backend: str | None, relayed: bool
) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:6379/0")
    if backend is None:
        monkeypatch.delenv("CELERY_RESULT_BACKEND", raising=False)
    else:
        monkeypatch.setenv("CELERY_RESULT_BACKEND", backend)
    assert (relayed_backend(Settings.from_env()) is not None) is relayed


def test_the_same_backend_by_another_password_is_one_outbox() -> None:
    assert backend_id("redis://:a@h:6379/1") == backend_id("redis://:b@h/1") != backend_id("redis://h/2")


@pytest.mark.parametrize("backend", ["rpc://", "db+postgresql://u@h/db", "127.0.0.1:6379"])
def test_a_result_backend_crucible_cannot_write_is_refused_at_start(
    monkeypatch: pytest.MonkeyPatch, backend: str
) -> None:
    monkeypatch.setenv("CELERY_RESULT_BACKEND", backend)
    with pytest.raises(ConfigError, match="CELERY_RESULT_BACKEND must be a Redis URL"):
        Settings.from_env()
