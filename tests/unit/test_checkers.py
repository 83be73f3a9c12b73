"""The built-in checkers: what each accepts, and a message naming the first difference."""

from __future__ import annotations

import pytest

from evaluations.submission_spec import Checker
from executor.checkers import check


@pytest.mark.parametrize(
    ("kind", "expected", "output", "accepted"),
    [
        ("exact", "1\n2\n", "1\n2\n", True),
        ("exact", "1\n2\n", "1\n2", False),
        ("exact", "1\n", "1 \n", False),
        ("trimmed", "1\n2\n", "1  \n2\n\n\n", True),
        ("trimmed", "1\n2", "1\n3", False),
        ("trimmed", "a b", "a  b", False),  # inner spaces still count
        ("tokens", "1 2\n3", "1\n2 3\n", True),
        ("tokens", "1 2 3", "1 2", False),
        ("float", "0.3333", "0.33330000001", True),
        ("float", "0.3333 x", "0.3334 x", False),
        ("float", "nan", "nan", True),  # the same token
        ("float", "1.0", "nan", False),
    ],
)
def test_each_checker(kind: str, expected: str, output: str, accepted: bool) -> None:
    assert check(Checker(kind, abs_tol=1e-6, rel_tol=1e-6), expected, output).accepted is accepted


def test_a_wrong_answer_names_where_it_went_wrong() -> None:
    assert check(Checker("trimmed"), "1\n2\n3\n", "1\n2\n4\n").message == "line 3: expected '3', got '4'"
    assert check(Checker("tokens"), "1 2", "1").message == "expected 2 tokens, got 1"
    assert check(Checker("float", abs_tol=0.1), "1 2", "1 2.5").message == "token 2: expected '2', got '2.5'"
    assert check(Checker("float", abs_tol=0.5, rel_tol=0), "1 2", "1 2.5").accepted
