"""Small parts of the CLI that need no process: URLs fit to print, where to reach a piece,
and what `crucible up` says of ports it cannot use."""

from __future__ import annotations

import socket

import pytest

from app.cli.ports import Listener, free_port, port_problem
from infra.redis_client import redact_url


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:hunter2@host:6379/0", "redis://:***@host:6379/0"),
        ("redis://user:p@ss@host/0", "redis://user:***@host/0"),  # a password holding '@'
        ("redis://user@host/0", "redis://user@host/0"),
        ("redis://host/0?password=hunter2&db=1", "redis://host/0?password=***&db=1"),
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    ],
)
def test_a_redis_url_is_shown_without_its_password(url: str, shown: str) -> None:
    assert redact_url(url) == shown


@pytest.mark.parametrize(
    ("host", "url"),
    [("127.0.0.1", "http://127.0.0.1:80"), ("0.0.0.0", "http://127.0.0.1:80"), ("::", "http://[::1]:80"),
     ("::1", "http://[::1]:80"), ("example.org", "http://example.org:80")],
)  # fmt: skip
def test_a_piece_is_reached_where_it_listens(host: str, url: str) -> None:
    assert Listener("API", host, 80, "CRUCIBLE_API_PORT").url == url


def test_port_problems_name_the_setting_that_moves_them() -> None:
    port = free_port()
    api, executor = (Listener("API", "127.0.0.1", port, "CRUCIBLE_API_PORT"),
                     Listener("executor", "127.0.0.1", port, "EXECUTOR_PORT"))  # fmt: skip
    assert port_problem([api, executor]) == (
        f"the executor and the API are both given port {port}; "
        "set EXECUTOR_PORT or CRUCIBLE_API_PORT to another port"
    )
    nowhere = Listener("API", "no-such-host.invalid", port, "CRUCIBLE_API_PORT")
    said = port_problem([nowhere])
    assert said == "the API's host 'no-such-host.invalid' is not an address of this machine"
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        taken = held.getsockname()[1]
        said = port_problem([Listener("dashboard", "127.0.0.1", taken, "DASHBOARD_PORT")])
    assert said is not None and said.startswith(f"port {taken} (dashboard) is taken by ")
    assert said.endswith("set DASHBOARD_PORT to another port")


def test_a_long_test_run_gets_uid_blocks_again_once_their_executors_have_gone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every block handed out was kept from this process forever: the 41st executor a test run
    started found none, though their executors had long gone."""
    from bench import stack

    clock = [1000.0]
    monkeypatch.setattr(stack, "_given", {})
    monkeypatch.setattr(stack.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(stack.uid_range, "is_free", lambda uids: True)  # every executor has gone
    first = {stack.free_uid_base() for _ in range(len(stack.UID_BLOCKS))}
    assert len(first) == len(stack.UID_BLOCKS)  # none twice within the minute
    clock[0] += stack.GIVEN_FOR_S
    assert stack.free_uid_base() in first  # free again: nothing holds it
