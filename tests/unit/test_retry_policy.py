"""The contract's retry policies: delays, jitter bounds, which failures retry under which policy."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
import redis

import retry_config
from actors.executor_client import ExecutorHTTPError, ExecutorUnavailable
from evaluations.retry_policies import RETRY_POLICIES, with_overrides
from infra.settings import ConfigError, Settings, get_settings
from middleware.retry_policy import (
    NON_RETRYABLE_HTTP_CODES,
    RETRYABLE_HTTP_CODES,
    RetryStrategy,
    calculate_retry_delay,
    get_retry_message,
    policy_for,
    should_retry_http_error,
)


def test_policies_are_the_seed_readmes() -> None:
    assert RETRY_POLICIES["default"] == {
        "max_retries": 3, "base_delay": 5, "exponential_base": 2, "max_delay": 300, "jitter": True,
    }  # fmt: skip
    assert RETRY_POLICIES["network_error"] == {
        "max_retries": 5, "base_delay": 10, "exponential_base": 1.5, "max_delay": 600,
    }  # fmt: skip


#: The original platform's `retry_config` module's other named policies, with its values.
ORIGINAL_NAMED_POLICIES = {
    "aggressive": {
        "max_retries": 10, "base_delay": 1, "max_delay": 600, "exponential_base": 1.5, "jitter": True,
    },
    "conservative": {
        "max_retries": 3, "base_delay": 5, "max_delay": 60, "exponential_base": 2, "jitter": False,
    },
    "quota_exceeded": {
        "max_retries": 10, "base_delay": 10, "max_delay": 300, "exponential_base": 1.5, "jitter": True,
    },
}  # fmt: skip


@pytest.fixture
def settings_without_overrides(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """`retry_config` reads the process's settings (read once, cached): read them afresh."""
    monkeypatch.delenv("CRUCIBLE_RETRY_POLICIES", raising=False)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def test_the_original_platforms_other_named_policies_are_there_with_its_values() -> None:
    assert set(RETRY_POLICIES) == {"default", "network_error", *ORIGINAL_NAMED_POLICIES}
    for name, values in ORIGINAL_NAMED_POLICIES.items():
        assert RETRY_POLICIES[name] == values


def test_retry_config_gives_the_original_delays_for_its_named_policies(
    settings_without_overrides: None,
) -> None:
    def delays(policy: str, count: int) -> list[float]:
        return [retry_config.calculate_retry_delay(n, policy, add_jitter=False) for n in range(count)]

    assert delays("aggressive", 5) == [1, 1.5, 2.25, 3.375, 5.0625]
    assert delays("aggressive", 17)[-2:] == [1.5**15, 600]  # 437.89..., then the cap
    assert delays("conservative", 6) == [5, 10, 20, 40, 60, 60]
    assert delays("quota_exceeded", 11) == [10, 15, 22.5, 33.75, 50.625, 75.9375, 113.90625, 170.859375,
                                            256.2890625, 300, 300]  # fmt: skip
    assert retry_config.calculate_retry_delay(50, "aggressive", add_jitter=False) == 600
    for name, values in ORIGINAL_NAMED_POLICIES.items():
        assert retry_config.RETRY_POLICIES[name] == values
        assert retry_config.RetryStrategy(name).config == values
        assert retry_config.RetryStrategy(name).max_retries == values["max_retries"]
    # each policy's own jitter setting applies when the caller does not say
    assert {retry_config.calculate_retry_delay(2, "conservative") for _ in range(50)} == {20}
    assert all(2.25 <= retry_config.calculate_retry_delay(2, "aggressive") <= 2.25 * 1.25 for _ in range(50))
    assert len({retry_config.calculate_retry_delay(2, "quota_exceeded") for _ in range(50)}) > 1


@pytest.mark.parametrize("policy", sorted(ORIGINAL_NAMED_POLICIES))
def test_a_named_policy_stops_retrying_at_its_own_max_retries(
    policy: str, settings_without_overrides: None
) -> None:
    strategy = retry_config.RetryStrategy(policy)
    last = ORIGINAL_NAMED_POLICIES[policy]["max_retries"]
    unavailable = ExecutorHTTPError("x", 503, "")
    assert all(strategy.should_retry(unavailable, n) for n in range(last))
    assert strategy.should_retry(unavailable, last) is False
    assert strategy.should_retry(ConnectionError("Connection refused"), last - 1) is True
    assert strategy.should_retry(ConnectionError("Connection refused"), last) is False
    assert strategy.should_retry(ExecutorHTTPError("x", 404, ""), 0) is False


def test_an_override_changes_only_its_key_of_its_named_policy(
    monkeypatch: pytest.MonkeyPatch, settings_without_overrides: None
) -> None:
    policies = with_overrides('{"aggressive": {"max_retries": 2}}')
    assert policies["aggressive"] == {**ORIGINAL_NAMED_POLICIES["aggressive"], "max_retries": 2}
    assert {k: v for k, v in policies.items() if k != "aggressive"} == {
        k: v for k, v in RETRY_POLICIES.items() if k != "aggressive"
    }
    assert RETRY_POLICIES["aggressive"]["max_retries"] == 10  # the built-in table is untouched
    strategy = RetryStrategy("aggressive", policies)
    assert strategy.should_retry(ExecutorHTTPError("x", 503, ""), 1) is True
    assert strategy.should_retry(ExecutorHTTPError("x", 503, ""), 2) is False
    # each named policy can be overridden from the environment, as retry_config reads it
    overrides = '{"conservative": {"max_delay": 30}, "quota_exceeded": {"jitter": false}}'
    monkeypatch.setenv("CRUCIBLE_RETRY_POLICIES", overrides)
    get_settings.cache_clear()
    assert retry_config.RetryStrategy("conservative").config == {**ORIGINAL_NAMED_POLICIES["conservative"],
                                                                  "max_delay": 30}  # fmt: skip
    assert retry_config.calculate_retry_delay(3, "conservative", add_jitter=False) == 30
    assert {retry_config.calculate_retry_delay(1, "quota_exceeded") for _ in range(50)} == {15}
    assert retry_config.RETRY_POLICIES["aggressive"] == ORIGINAL_NAMED_POLICIES["aggressive"]


def test_delays_without_jitter_follow_the_formula() -> None:
    assert [calculate_retry_delay(n, add_jitter=False) for n in range(3)] == [5, 10, 20]
    assert [calculate_retry_delay(n, "network_error", add_jitter=False) for n in range(3)] == [10, 15, 22.5]
    assert calculate_retry_delay(20, add_jitter=False) == 300
    assert calculate_retry_delay(30, "network_error", add_jitter=False) == 600


@pytest.mark.parametrize("policy", ["default", "network_error", *ORIGINAL_NAMED_POLICIES])
def test_jitter_adds_at_most_a_quarter_and_never_passes_the_cap(policy: str) -> None:
    cap = RETRY_POLICIES[policy]["max_delay"]
    for n in range(12):
        base = calculate_retry_delay(n, policy, add_jitter=False)
        samples = [calculate_retry_delay(n, policy, add_jitter=True) for _ in range(300)]
        assert all(base <= s <= min(cap, base * 1.25) for s in samples)
        if base < cap:
            assert max(samples) > base  # jitter is really applied
    assert calculate_retry_delay(0, "default", add_jitter=None) >= 5


def test_each_policy_uses_its_own_jitter_setting_by_default() -> None:
    assert len({calculate_retry_delay(1, "default") for _ in range(50)}) > 1
    assert {calculate_retry_delay(1, "network_error") for _ in range(50)} == {15}


def test_http_statuses_follow_the_contract() -> None:
    for code in (408, 429, 500, 502, 503, 504):
        assert should_retry_http_error(code)[0] is True
    for code in (400, 401, 403, 404, 405, 406, 409, 410, 422):
        assert should_retry_http_error(code)[0] is False
    # the original module's answers, phrases included
    assert should_retry_http_error(503) == (True, "Service Unavailable")
    assert should_retry_http_error(501) == (True, "Server Error")
    assert should_retry_http_error(404) == (False, "Not Found")
    assert should_retry_http_error(418) == (False, "Unknown Error")
    assert (
        RETRYABLE_HTTP_CODES[429] == "Too Many Requests"
        and NON_RETRYABLE_HTTP_CODES[422] == "Unprocessable Entity"
    )


def test_each_failure_takes_its_policy() -> None:
    assert policy_for(ExecutorUnavailable("refused")) == "network_error"
    assert policy_for(httpx.ConnectError("refused")) == "network_error"
    assert policy_for(httpx.ReadTimeout("slow")) == "network_error"
    assert policy_for(redis.ConnectionError("gone")) == "network_error"
    assert policy_for(ExecutorHTTPError("x", 503, "")) == "default"
    assert policy_for(ExecutorHTTPError("x", 429, "")) == "network_error"
    assert policy_for(ExecutorHTTPError("x", 422, "")) is None
    assert policy_for(RuntimeError("bug")) == "default"


def test_strategy_and_message_shapes() -> None:
    strategy = RetryStrategy("default")
    assert strategy.should_retry(ExecutorHTTPError("x", 500, ""), 2) is True
    assert strategy.should_retry(ExecutorHTTPError("x", 500, ""), 3) is False
    assert strategy.should_retry(ExecutorHTTPError("x", 404, ""), 0) is False
    assert 5 <= strategy.get_retry_delay(0) <= 6.25
    assert get_retry_message("evaluate_code", "e1", 0, 3, 5.0, "boom") == (
        "Task evaluate_code for evaluation e1 failed: boom. Retry 1/3 in 5.0s"
    )


def test_the_strategy_reads_a_response_status_and_otherwise_the_message_as_the_original() -> None:
    strategy = RetryStrategy("default")
    not_found = httpx.HTTPStatusError(
        "no", request=httpx.Request("GET", "http://x"), response=httpx.Response(404)
    )
    unavailable = httpx.HTTPStatusError(
        "busy", request=httpx.Request("GET", "http://x"), response=httpx.Response(503)
    )
    assert strategy.should_retry(not_found, 0) is False  # its response says 404
    assert strategy.should_retry(unavailable, 0) is True
    assert strategy.should_retry(ConnectionError("Connection refused"), 0) is True
    assert strategy.should_retry(RuntimeError("read timeout"), 0) is True
    assert strategy.should_retry(RuntimeError("bug"), 0) is False
    with pytest.raises(ValueError, match="unknown retry policy"):
        RetryStrategy("nope")


def test_policies_can_be_overridden_from_configuration_without_changing_the_seeds_table() -> None:
    seed = {k: dict(v) for k, v in RETRY_POLICIES.items()}
    overrides = '{"default": {"max_retries": 7}, "network_error": {"base_delay": 1}, "slow": {}}'
    policies = with_overrides(overrides)
    assert policies["default"]["max_retries"] == 7
    assert policies["slow"] == seed["default"]
    assert calculate_retry_delay(0, "network_error", add_jitter=False, policies=policies) == 1
    assert RetryStrategy("default", policies).max_retries == 7
    assert RETRY_POLICIES == seed
    with pytest.raises(ValueError, match="unknown keys"):
        with_overrides('{"default": {"retries": 7}}')
    with pytest.raises(ValueError, match="not JSON"):
        with_overrides("{")


def test_a_bad_override_is_a_configuration_error_naming_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRUCIBLE_RETRY_POLICIES", '{"default": 3}')
    with pytest.raises(ConfigError, match=r"CRUCIBLE_RETRY_POLICIES\['default'\] must be an object"):
        Settings.from_env()
    monkeypatch.setenv("CRUCIBLE_RETRY_POLICIES", '{"default": {"max_retries": 9}}')
    assert Settings.from_env().retry_policies["default"]["max_retries"] == 9
