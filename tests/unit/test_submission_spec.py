"""One submission spec: files, test cases, checkers and limits are checked in one place, and
each refusal names the field at fault (nested ones from the top: `tests[1].timeout`)."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from evaluations.errors import InvalidInput, TooLarge
from evaluations.submission_spec import Bounds, Case, Checker, RunSpec, SourceFile, parse_run

BOUNDS = Bounds(
    max_code_bytes=1000, max_stdin_bytes=1000, default_timeout=5, max_timeout=10, max_memory_mb=512,
    max_output_bytes=4096, max_files=3, max_files_bytes=100, max_cases=4, max_total_wall_s=100,
)
LANGUAGES = {"python": "main.py", "c": "main.c"}


def file(name: str, content: str = "x", **more: str) -> dict[str, str]:
    return {"name": name, "content": content, **more}


def parse(**body: Any) -> RunSpec:
    return parse_run({"code": "print(1)", **body}, BOUNDS, LANGUAGES)


@pytest.mark.parametrize(
    ("body", "field", "kind"),
    [
        ({"files": [file("../etc/passwd")]}, "files[0].name", InvalidInput),
        ({"files": [file("/abs")]}, "files[0].name", InvalidInput),
        ({"files": [file("a/./b")]}, "files[0].name", InvalidInput),
        ({"files": [file("a", "@@", encoding="base64")]}, "files[0].content", InvalidInput),
        ({"files": [file("a", encoding="latin-1")]}, "files[0].encoding", InvalidInput),
        ({"files": [file("main.py")]}, "files[0].name", InvalidInput),
        ({"files": [file("main")]}, "files[0].name", InvalidInput),
        ({"files": [file("a"), file("a", "y")]}, "files[1].name", InvalidInput),
        ({"files": [file("a"), file("a/b", "y")]}, "files[1].name", InvalidInput),
        ({"files": [file(f"f{n}") for n in range(4)]}, "files", InvalidInput),
        ({"files": [file("big", "x" * 101)]}, "files", TooLarge),
        ({"files": "data.txt"}, "files", InvalidInput),
        ({"entry": "nope.py", "code": None, "files": [file("a.py")]}, "entry", InvalidInput),
        ({"entry": "a.py", "files": [file("a.py")]}, "entry", InvalidInput),  # code too
        ({"tests": [{}] * 5}, "tests", InvalidInput),
        ({"tests": [{}, {"timeout": 0.5}]}, "tests[1].timeout", InvalidInput),
        ({"tests": [{"memory_mb": 64.5}]}, "tests[0].memory_mb", InvalidInput),
        ({"tests": [{"expected_output": 3}]}, "tests[0].expected_output", InvalidInput),
        ({"tests": [{"timeout": 10}] * 4}, "tests", InvalidInput),  # 4 x 30 s over the 100 s budget
        ({"tests": [{}], "checker": "regex"}, "checker", InvalidInput),
        ({"tests": [{}], "checker": {"code": "x", "language": "cobol"}}, "checker.language", InvalidInput),
        ({"tests": [{}], "checker": {"type": "float", "rel_tol": 2}}, "checker.rel_tol", InvalidInput),
        ({"wall_timeout": 31}, "wall_timeout", InvalidInput),  # past 3 x max_timeout
        ({"stop_on_first_failure": "yes"}, "stop_on_first_failure", InvalidInput),
    ],
)
def test_a_refusal_names_the_field(body: dict[str, Any], field: str, kind: type[Exception]) -> None:
    with pytest.raises(kind) as refused:
        parse(**body)
    assert refused.value.details["field"] == field, refused.value.message
    assert f"'{field}'" in refused.value.message


def test_files_entry_cases_and_checker_are_read_and_travel_as_fields_unchanged() -> None:
    blob = bytes(range(200, 256))
    run = parse(
        code=None, entry="solve.py", wall_timeout=7.5, stop_on_first_failure=True,
        files=[{"name": "solve.py", "content": "print(2)"}, {"name": "data/in.bin", "content":
               base64.b64encode(blob).decode(), "encoding": "base64"}],
        tests=[{"name": "one", "stdin": "1", "expected_output": "1\n", "timeout": 2},
               {"args": ["-v"], "wall_timeout": 4, "memory_mb": 64}],
        checker={"type": "float", "abs_tol": 0.01},
    )  # fmt: skip
    assert run.code == "print(2)" and run.files == (SourceFile("data/in.bin", blob),)
    assert run.tests == (Case("one", "1", (), "1\n", 2.0), Case("case 2", None, ("-v",), None, None, 4.0, 64))
    assert run.checker == Checker("float", 0.01, 1e-9) and run.stop_on_first_failure
    assert run.total_wall == 2 * 3 + 4  # the first case's CPU limit x 3, the second's own wall limit
    again = RunSpec.from_fields(run.fields())
    assert again == RunSpec(**{**run.__dict__, "entry": None})  # the entry is the main file now


def test_a_submission_without_tests_travels_as_it_always_did() -> None:
    run = parse(timeout=2)
    assert run.fields() == {"code": "print(1)", "language": "python", "timeout": 2.0}
    assert run.total_wall == 6.0 and not run.tests


def test_a_custom_checker_counts_its_own_runs_in_the_budget() -> None:
    plain = parse(tests=[{}, {}])
    custom = parse(tests=[{}, {}], checker={"code": "import sys", "language": "python"})
    assert custom.checker.custom is not None and custom.total_wall > plain.total_wall
    assert RunSpec.from_fields(custom.fields()).checker == custom.checker
