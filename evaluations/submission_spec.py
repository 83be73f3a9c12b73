"""One submission spec: the fields a run may ask for and their bounds, checked by the one
function every door uses (the HTTP API, the Celery shim and wire, and the executor's
`POST /execute`), so no door accepts what another refuses and nothing a worker carries
can be refused later, when no retry could help it.

The bounds are the deployment's (`infra.settings.Settings.submission_bounds`); what a field
is and how it is checked lives here alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from evaluations.errors import InvalidInput
from evaluations.validation import (
    MAX_ARG_BYTES,
    MAX_ARGS,
    MIN_MEMORY_MB,
    require_number,
    require_string,
    require_string_list,
)

#: The shortest wall-time limit a run may ask for, in seconds (fractions above it are kept).
MIN_TIMEOUT_S = 1.0
#: The smallest output cap a run may ask for, in bytes.
MIN_OUTPUT_BYTES = 1
#: What a run asks for, beside the submission's own `eval_id` and `priority`.
RUN_FIELDS = ("code", "language", "timeout", "stdin", "args", "memory_mb", "output_limit")


@dataclass(frozen=True)
class Bounds:
    """The deployment's limits on what a run may ask for."""

    max_code_bytes: int
    max_stdin_bytes: int
    default_timeout: float
    max_timeout: float
    #: the most memory a run may ask for, and what it gets when it asks for none
    max_memory_mb: int
    #: the largest output cap, and the cap a run gets when it asks for none
    max_output_bytes: int


@dataclass(frozen=True)
class RunSpec:
    """One run, as checked: None where the caller left the deployment's default."""

    code: str
    language: str
    timeout: float
    stdin: str | None = None
    args: tuple[str, ...] = field(default_factory=tuple)
    memory_mb: int | None = None
    output_limit: int | None = None

    def memory_or_default(self, bounds: Bounds) -> int:
        return self.memory_mb or bounds.max_memory_mb

    def output_limit_or_default(self, bounds: Bounds) -> int:
        return self.output_limit or bounds.max_output_bytes

    def fields(self) -> dict[str, Any]:
        """As a message's or a request's fields: those left to the default are left out, so a
        message stays readable by workers that predate them."""
        given = {"stdin": self.stdin, "args": list(self.args) or None, "memory_mb": self.memory_mb,
                 "output_limit": self.output_limit}  # fmt: skip
        required = {"code": self.code, "language": self.language, "timeout": self.timeout}
        return {**required, **{name: value for name, value in given.items() if value is not None}}


def parse_run(body: dict[str, Any], bounds: Bounds, languages: list[str]) -> RunSpec:
    """The run `body` asks for, or an `InvalidInput`/`TooLarge` naming the first field at fault."""
    code = require_string(body, "code", max_bytes=bounds.max_code_bytes)
    if not code.strip():
        raise InvalidInput("field 'code' must not be empty", field="code")
    language = require_string(body, "language", default="python")
    if language not in languages:
        raise InvalidInput(f"unknown language {language!r}", field="language", known=sorted(languages))
    timeout = require_number(
        body, "timeout", default=bounds.default_timeout, low=MIN_TIMEOUT_S, high=bounds.max_timeout
    )
    stdin = require_string(body, "stdin", default=None, max_bytes=bounds.max_stdin_bytes)
    args = require_string_list(body, "args", max_items=MAX_ARGS, max_bytes=MAX_ARG_BYTES)
    memory_mb = require_number(
        body, "memory_mb", default=None, low=MIN_MEMORY_MB, high=bounds.max_memory_mb, integer=True
    )
    output_limit = require_number(
        body, "output_limit", default=None, low=MIN_OUTPUT_BYTES, high=bounds.max_output_bytes, integer=True
    )
    return RunSpec(code, language, float(timeout), stdin, tuple(args), memory_mb, output_limit)
