"""The Celery service's retry policies as data: the built-in table (the seed README's two
policies plus the original platform's other named ones), and the table a deployment runs with
once `CRUCIBLE_RETRY_POLICIES` is merged into it.

The merged table is made once per process from its settings (`Settings.retry_policies`) and
handed to whatever retries or reports retries, so an API process and a worker started with the
same environment show and use the same policies; the built-in table itself is never changed.
"""

from __future__ import annotations

import json
from typing import Any

Policies = dict[str, dict[str, Any]]

#: The built-in policies (`retry_config.RETRY_POLICIES` without overrides): the seed README's
#: `default` and `network_error`, to the letter, then the other named policies the original
#: platform's `retry_config` module offered (callers name them), with its values. The worker's
#: own retries take only `default` and `network_error` (`middleware.retry_policy.policy_for`).
RETRY_POLICIES: Policies = {
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
    "aggressive": {
        "max_retries": 10,
        "base_delay": 1,
        "max_delay": 600,
        "exponential_base": 1.5,
        "jitter": True,
    },
    "conservative": {
        "max_retries": 3,
        "base_delay": 5,
        "max_delay": 60,
        "exponential_base": 2,
        "jitter": False,
    },
    "quota_exceeded": {
        "max_retries": 10,
        "base_delay": 10,
        "max_delay": 300,
        "exponential_base": 1.5,
        "jitter": True,
    },
}


def with_overrides(raw: str | None, base: Policies = RETRY_POLICIES) -> Policies:
    """A new table: `base` with `raw` merged in (JSON: {"default": {"max_retries": 5}, ...}); a
    policy named only there starts from `default`. ValueError names what is wrong with `raw`."""
    policies = {name: dict(values) for name, values in base.items()}
    if not raw:
        return policies
    try:
        overrides = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"CRUCIBLE_RETRY_POLICIES is not JSON: {exc}") from None
    if not isinstance(overrides, dict):
        raise ValueError("CRUCIBLE_RETRY_POLICIES must be a JSON object of policies")
    for name, values in overrides.items():
        if not isinstance(values, dict):
            raise ValueError(f"CRUCIBLE_RETRY_POLICIES[{name!r}] must be an object")
        unknown = set(values) - set(base["default"])
        if unknown:
            raise ValueError(f"CRUCIBLE_RETRY_POLICIES[{name!r}] has unknown keys {sorted(unknown)}")
        policies.setdefault(name, dict(base["default"])).update(values)
    return policies
