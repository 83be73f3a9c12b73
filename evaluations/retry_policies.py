"""The Celery service's retry policies as data: the seed's table, and the table a deployment
runs with once `CRUCIBLE_RETRY_POLICIES` is merged into it.

The merged table is made once per process from its settings (`Settings.retry_policies`) and
handed to whatever retries or reports retries, so an API process and a worker started with the
same environment show and use the same policies; the seed's table itself is never changed.
"""

from __future__ import annotations

import json
from typing import Any

Policies = dict[str, dict[str, Any]]

#: The seed README's policies, to the letter (`retry_config.RETRY_POLICIES` without overrides).
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
