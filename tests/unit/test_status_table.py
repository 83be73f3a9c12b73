"""Which status may follow which is written once, in evaluations/status.py's TRANSITIONS."""

from __future__ import annotations

import re

import pytest

from evaluations.status import FETCH, HAND_BACK, STATUSES, TERMINAL, TRANSITIONS, Status, celery_state
from evaluations.store import StatusChange
from tests.unit.import_graph import ROOT, modules

DISPATCH_LUA = (ROOT / "actors" / "lua" / "dispatch.lua").read_text()
#: transition(ns, eval_id, "<new status>", now, "<allowed_from csv>", ...) as the broker's script calls it
LUA_CALL = re.compile(r'transition\(ns, eval_id, "(\w+)", now, "([\w,+]+)"')


def test_the_broker_script_changes_statuses_exactly_as_the_table_says() -> None:
    calls = {(to, tuple(allowed.split(","))) for to, allowed in LUA_CALL.findall(DISPATCH_LUA)}
    assert calls == {
        (Status.RUNNING.value, FETCH.allowed_from),  # a fetch marks what it takes running
        (Status.QUEUED.value, HAND_BACK.allowed_from),  # a stopping worker's hand-back
    }


def test_every_transition_names_real_statuses() -> None:
    for transition in TRANSITIONS.values():
        assert set(transition.to) <= set(STATUSES), transition.name
        assert {rule.split("+")[0] for rule in transition.allowed_from} <= set(STATUSES), transition.name


def test_a_status_change_takes_its_guard_from_the_table_and_refuses_a_status_it_cannot_set() -> None:
    change = StatusChange.by(TRANSITIONS["finish"], "e1", "completed", {"output": "1\n"})
    assert change.allowed_from == ("running",)
    with pytest.raises(ValueError, match="cannot set status 'queued'"):
        StatusChange.by(TRANSITIONS["finish"], "e1", "queued", {})


def test_no_code_outside_the_table_spells_which_statuses_a_change_may_leave() -> None:
    """A literal tuple of statuses passed where a change is guarded is a second copy of the table."""
    spelled = re.compile(r"(StatusChange\(|\.transition\()[^)]*\(\s*\"(queued|running|failed)\"")
    offenders = [
        name
        for name, path in modules().items()
        if name not in ("evaluations.status",) and spelled.search(path.read_text())
    ]
    assert offenders == []


def test_terminal_statuses_and_celery_states() -> None:
    assert Status.QUEUED not in TERMINAL and Status.RUNNING not in TERMINAL
    assert celery_state({"status": "running", "next_retry_at": "2026-01-01T00:00:00"}) == "RETRY"
    assert celery_state({"status": "timeout"}) == "SUCCESS"
    assert celery_state({"status": "cancelled"}) == "REVOKED"
