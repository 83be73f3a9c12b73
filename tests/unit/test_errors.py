"""Domain exceptions become HTTP answers in one place (infra/web.py)."""

from __future__ import annotations

from evaluations import errors
from infra.web import HTTP_STATUS, error_body, status_of


def test_every_kind_of_refusal_has_its_status_code() -> None:
    kinds = {k for k in vars(errors).values() if isinstance(k, type) and issubclass(k, errors.CrucibleError)}
    assert kinds - {errors.CrucibleError, errors.Refusal} == set(HTTP_STATUS)
    assert status_of(errors.NotFound("no such evaluation")) == 404
    assert status_of(errors.LimitExceeded("slow down", headers={"Retry-After": "1"})) == 429


def test_a_body_that_is_not_json_is_a_422_shaped_like_every_refusal() -> None:
    """As the original (FastAPI) service answered; `infra.web.read_json` raises it."""
    refusal = errors.MalformedInput("request body is not valid JSON", reason="unexpected end of data")
    assert status_of(refusal) == 422 == status_of(errors.InvalidInput("field 'code' is required"))
    assert error_body(refusal) == {
        "error": "request body is not valid JSON",
        "details": {"reason": "unexpected end of data"},
    }


def test_a_subclass_answers_as_its_base() -> None:
    class LegacyDown(errors.Unavailable):
        pass

    assert status_of(LegacyDown("the legacy broker failed")) == 503


def test_the_body_names_the_problem_and_the_field() -> None:
    refusal = errors.InvalidInput("field 'timeout' must be a number", field="timeout")
    assert error_body(refusal) == {
        "error": "field 'timeout' must be a number",
        "details": {"field": "timeout"},
    }


def test_a_refusal_may_carry_any_detail_even_one_named_message() -> None:
    """A refused cancel answers 400 with the contract's fields, `message` among them."""
    said = "Task was already cancelled"
    refusal = errors.Refused(said, message=said, cancelled=False)
    assert status_of(refusal) == 400
    assert error_body(refusal)["details"] == {"message": said, "cancelled": False}


def test_an_outage_of_ours_is_no_refusal_of_the_callers() -> None:
    """Code that turns refusals into per-item answers (a batch) or ValueErrors (the Celery shim)
    catches `Refusal`; a 503 must still reach the caller as a 503."""
    assert not issubclass(errors.Unavailable, errors.Refusal) and not issubclass(errors.Busy, errors.Refusal)
    assert status_of(errors.Busy("executor busy", capacity=8)) == 503
