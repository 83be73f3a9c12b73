"""Comparing a case's output with the output it expects, by the submission's checker.

Pure functions over text: a custom checker, which is a program, is run by the sandbox
(`executor.cases`) and only its exit status and message come here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from evaluations.submission_spec import Checker

#: How much of a differing line or token a message quotes.
QUOTE = 40


@dataclass(frozen=True)
class Checked:
    accepted: bool
    #: why not, for people (empty when accepted)
    message: str = ""


def check(checker: Checker, expected: str, output: str) -> Checked:
    """`output` against `expected` under `checker` (not a custom one)."""
    if checker.kind == "exact":
        return Checked(True) if output == expected else _first_difference(expected, output, exact=True)
    if checker.kind == "tokens":
        return _tokens(expected.split(), output.split(), None)
    if checker.kind == "float":
        return _tokens(expected.split(), output.split(), checker)
    if _trimmed(output) == _trimmed(expected):
        return Checked(True)
    return _first_difference(_trimmed(expected), _trimmed(output), exact=False)


def _trimmed(text: str) -> str:
    """Without trailing whitespace on each line, and without trailing blank lines."""
    return "\n".join(line.rstrip() for line in text.rstrip().splitlines())


def _first_difference(expected: str, output: str, exact: bool) -> Checked:
    want, got = expected.split("\n"), output.split("\n")
    for number, (a, b) in enumerate(zip(want, got, strict=False), start=1):
        if a != b:
            return Checked(False, f"line {number}: expected {_quote(a)}, got {_quote(b)}")
    if len(want) != len(got):
        return Checked(False, f"expected {len(want)} lines, got {len(got)}")
    return Checked(False, "the output differs in its line endings" if exact else "the output differs")


def _tokens(want: list[str], got: list[str], tolerance: Checker | None) -> Checked:
    for number, (a, b) in enumerate(zip(want, got, strict=False), start=1):
        if a == b:
            continue
        if tolerance is not None and _close(a, b, tolerance):
            continue
        return Checked(False, f"token {number}: expected {_quote(a)}, got {_quote(b)}")
    if len(want) != len(got):
        return Checked(False, f"expected {len(want)} tokens, got {len(got)}")
    return Checked(True)


def _close(a: str, b: str, tolerance: Checker) -> bool:
    try:
        x, y = float(a), float(b)
    except ValueError:
        return False
    if math.isnan(x) or math.isnan(y):
        return False
    return math.isclose(x, y, rel_tol=tolerance.rel_tol, abs_tol=tolerance.abs_tol)


def _quote(text: str) -> str:
    return repr(text if len(text) <= QUOTE else text[:QUOTE] + "...")
