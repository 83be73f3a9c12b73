"""A submission's test cases: each case's limits, its status once run and checked, and the
evaluation's answer made of them. Pure functions; `executor.sandbox.Sandbox.run_cases` runs
the cases (one compile, then a fresh sandbox for every case and every custom checker run).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from evaluations.languages import WALL_TIME_FACTOR
from evaluations.submission_spec import CHECKER_WALL_S, Case, RunSpec
from executor.checkers import Checked
from executor.limits import Limits
from executor.verdict import RunResult

#: How much of each case's output and error the answer keeps (a checker sees all the run kept).
CASE_OUTPUT_BYTES = 4096
#: A custom checker's run: its limits, and the files it finds beside it.
CHECKER_MEMORY_MB = 256
CHECKER_FILES = ("input.txt", "output.txt", "expected_output.txt")
#: The checker's exit statuses (Kattis's): accepted, wrong answer. Anything else, 0 and 1
#: included (a Python checker that raised exits 1), is the checker failing.
CHECKER_ACCEPTED, CHECKER_WRONG = 42, 43
#: A run's statuses as a case's.
CASE_STATUS = {"failed": "runtime_error"}  # the others keep their names


@dataclass(frozen=True)
class Judged:
    """How one case ended: the run's result, and the checker's word when it was checked."""

    case: Case
    result: RunResult
    checked: Checked | None = None
    #: the custom checker itself failed (crashed, timed out, answered neither 0 nor 1)
    checker_failed: str | None = None

    @property
    def status(self) -> str:
        if self.checker_failed is not None:
            return "checker_error"
        if self.result.status != "completed":
            return CASE_STATUS.get(self.result.status, self.result.status)
        if self.checked is not None and not self.checked.accepted:
            return "wrong_answer"
        return "accepted"

    def to_dict(self) -> dict[str, Any]:
        r = self.result
        out: dict[str, Any] = {
            "name": self.case.name, "status": self.status, "exit_code": r.exit_code, "signal": r.signal,
            "output": r.output[:CASE_OUTPUT_BYTES], "error": r.error[:CASE_OUTPUT_BYTES],
            "output_truncated": r.output_truncated or len(r.output) > CASE_OUTPUT_BYTES,
            "runtime_ms": r.runtime_ms, "cpu_ms": r.cpu_ms, "peak_memory_kb": r.peak_memory_kb,
        }  # fmt: skip
        if r.status == "timeout":
            out["time_limit"] = r.time_limit  # which limit ended it: "cpu" or "wall"
        message = self.checker_failed or (self.checked.message if self.checked else "")
        if message:
            out["checker_message"] = message
        return out


def case_limits(limits: Limits, spec: RunSpec, case: Case) -> Limits:
    """A case's limits: its own where it gives them, else the submission's."""
    return dataclasses.replace(
        limits,
        timeout=case.timeout or limits.timeout,
        wall_s=spec.case_wall(case),
        memory_mb=case.memory_mb or limits.memory_mb,
    )


def checker_limits(limits: Limits) -> Limits:
    return dataclasses.replace(
        limits, timeout=CHECKER_WALL_S / WALL_TIME_FACTOR, wall_s=CHECKER_WALL_S,
        memory_mb=min(CHECKER_MEMORY_MB, limits.memory_mb), workdir="/sandbox",
    )  # fmt: skip


def checker_verdict(result: RunResult) -> tuple[Checked | None, str | None]:
    """A custom checker's run as (its word, or why it failed)."""
    message = result.output.strip()[:CASE_OUTPUT_BYTES]
    if result.status == "failed" and result.exit_code == CHECKER_ACCEPTED:
        return Checked(True, message), None
    if result.status == "failed" and result.exit_code == CHECKER_WRONG:
        return Checked(False, message or "wrong answer"), None
    said = (result.error.strip().splitlines() or [result.status])[-1][:200]
    return None, f"the checker failed ({result.status}, exit code {result.exit_code}): {said}"


def skipped(case: Case) -> dict[str, Any]:
    return {"name": case.name, "status": "skipped"}


def answer(
    eval_id: str,
    spec: RunSpec,
    judged: list[Judged],
    compile_info: dict[str, Any] | None,
    enforced_by: str,
    cancelled: bool,
) -> dict[str, Any]:
    """The whole evaluation's answer: the run's fields (those of the first case that did not
    pass, else of the last), with every case, the verdict and the compile step."""
    failing = [j for j in judged if j.status != "accepted"]
    shown = failing[0].result if failing else judged[-1].result if judged else None
    cases = [j.to_dict() for j in judged] + [skipped(c) for c in spec.tests[len(judged):]]
    broken = not cancelled and any(j.status == "checker_error" for j in judged)
    status = "cancelled" if cancelled else "failed" if broken else "completed"
    base = (
        dataclasses.replace(shown, eval_id=eval_id, status=status) if shown
        else RunResult(eval_id, status, None, None, "", "", False, False, 0.0)
    )  # fmt: skip
    out = base.to_dict()
    out.update(
        runtime_ms=round(sum(j.result.runtime_ms for j in judged), 2),
        cpu_ms=sum(j.result.cpu_ms for j in judged),
        peak_memory_kb=max((j.result.peak_memory_kb for j in judged), default=0),
        limits_enforced_by=enforced_by,
        verdict="cancelled" if cancelled else failing[0].status if failing else "accepted",
        passed=len(judged) - len(failing),
        total=len(spec.tests),
        cases=cases,
        compile=compile_info,
    )
    if broken:
        out["internal_error"] = True
    return out


def compile_failed(
    eval_id: str, spec: RunSpec, failed: RunResult, compile_info: dict[str, Any], checker: bool = False
) -> dict[str, Any]:
    """The answer when the program, or its custom checker (`checker`: our failure, not the
    submission's; `compile_info` is still the program's), did not compile: no case ran."""
    out = dataclasses.replace(failed, eval_id=eval_id).to_dict()
    verdict = "cancelled" if failed.status == "cancelled" else "checker_error" if checker else "compile_error"
    if checker and failed.status != "cancelled":
        said = "the checker did not compile:\n" + failed.error
        out.update(status="failed", internal_error=True, error=said)
    out.update(verdict=verdict, passed=0, total=len(spec.tests), cases=[skipped(c) for c in spec.tests],
               compile=compile_info)  # fmt: skip
    return out
