"""One submission spec: the fields a run may ask for and their bounds, checked by the one
function every door uses (the HTTP API, the Celery shim and wire, and the executor's
`POST /execute`), so no door accepts what another refuses and nothing a worker carries
can be refused later, when no retry could help it.

A run is one program (`code`, or `entry` naming one of `files`), with files beside it, and
either one execution (as always) or test cases (`tests`), each a fresh run of the same
program, compared with its expected output by a `checker`. `timeout` is CPU seconds (all the
run's processes); `wall_timeout` the wall-clock limit, 3 times `timeout` unless given; a case may
set its own.

The bounds are the deployment's (`infra.settings.Settings.submission_bounds`); what a field
is and how it is checked lives here alone.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from evaluations.errors import InvalidInput, Refusal, TooLarge
from evaluations.languages import COMPILE_TIMEOUT_SECONDS, WALL_TIME_FACTOR
from evaluations.validation import (
    MAX_ARG_BYTES,
    MAX_ARGS,
    MIN_MEMORY_MB,
    require_bool,
    require_number,
    require_string,
    require_string_list,
)

#: The shortest wall-time limit a run may ask for, in seconds (fractions above it are kept).
MIN_TIMEOUT_S = 1.0
#: The smallest output cap a run may ask for, in bytes.
MIN_OUTPUT_BYTES = 1
#: What a run asks for, beside the submission's own `eval_id` and `priority`.
RUN_FIELDS = ("code", "language", "timeout", "wall_timeout", "stdin", "args", "memory_mb", "output_limit",
              "files", "entry", "tests", "checker", "stop_on_first_failure")  # fmt: skip
#: How a case's output is compared with its expected output (`CustomChecker` aside).
CHECKERS = ("exact", "trimmed", "tokens", "float")
DEFAULT_CHECKER = "trimmed"
#: A file's path: at most this deep, each part at most this long.
MAX_PATH_PARTS = 8
MAX_PATH_PART = 128
MAX_CASE_NAME = 100
#: Wall-clock seconds a custom checker may take for one case (CPU: a third of it).
CHECKER_WALL_S = 6.0
#: Where a compiled program's binary is laid out: no file may take its name.
BINARY_NAME = "main"


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
    max_files: int
    #: all of a submission's files together, decoded
    max_files_bytes: int
    max_cases: int
    #: the wall-clock seconds all of a submission's cases may take together, at their limits
    max_total_wall_s: float

    @property
    def max_wall_timeout(self) -> float:
        return self.max_timeout * WALL_TIME_FACTOR


@dataclass(frozen=True)
class SourceFile:
    """A file laid out read-only beside the main file, at `name` under the working folder."""

    name: str
    content: bytes

    def to_json(self) -> dict[str, str]:
        try:
            return {"name": self.name, "content": self.content.decode("utf-8"), "encoding": "utf-8"}
        except UnicodeDecodeError:
            encoded = base64.b64encode(self.content).decode()
            return {"name": self.name, "content": encoded, "encoding": "base64"}


@dataclass(frozen=True)
class CustomChecker:
    """A program deciding a case: run sandboxed with the case's input, the expected output
    and the program's output as files; exit 0 accepts, another status is a wrong answer, and
    its stdout is the message."""

    code: str
    language: str


@dataclass(frozen=True)
class Checker:
    """How a case's output is compared with what it expects."""

    kind: str = DEFAULT_CHECKER
    abs_tol: float = 1e-9
    rel_tol: float = 1e-9
    custom: CustomChecker | None = None

    def to_json(self) -> dict[str, Any] | str:
        if self.custom:
            return {"code": self.custom.code, "language": self.custom.language}
        if self.kind == "float":
            return {"type": "float", "abs_tol": self.abs_tol, "rel_tol": self.rel_tol}
        return self.kind


@dataclass(frozen=True)
class Case:
    """One test case: the program run again with its own input and limits."""

    name: str
    stdin: str | None = None
    args: tuple[str, ...] = ()
    expected_output: str | None = None
    timeout: float | None = None
    wall_timeout: float | None = None
    memory_mb: int | None = None

    def to_json(self) -> dict[str, Any]:
        given = {"stdin": self.stdin, "args": list(self.args) or None,
                 "expected_output": self.expected_output, "timeout": self.timeout,
                 "wall_timeout": self.wall_timeout, "memory_mb": self.memory_mb}  # fmt: skip
        return {"name": self.name, **{k: v for k, v in given.items() if v is not None}}


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
    wall_timeout: float | None = None
    files: tuple[SourceFile, ...] = ()
    #: the file of `files` the caller named as the main file: `code` is its content, laid out
    #: as any main file is (the language's file name), and it is no longer among `files`
    entry: str | None = None
    tests: tuple[Case, ...] = ()
    checker: Checker = field(default_factory=Checker)
    stop_on_first_failure: bool = False

    @property
    def legacy_can_run(self) -> bool:
        """Whether the legacy Celery deployment could run it: one program and one run, no files,
        no cases, no wall-clock limit of its own (it takes only code and language)."""
        return not (self.tests or self.files or self.wall_timeout)

    def memory_or_default(self, bounds: Bounds) -> int:
        return self.memory_mb or bounds.max_memory_mb

    def output_limit_or_default(self, bounds: Bounds) -> int:
        return self.output_limit or bounds.max_output_bytes

    @property
    def wall(self) -> float:
        """The run's wall-clock limit (one case's, when a case sets none)."""
        return self.wall_timeout or self.timeout * WALL_TIME_FACTOR

    def case_wall(self, case: Case) -> float:
        if case.wall_timeout:
            return case.wall_timeout
        return case.timeout * WALL_TIME_FACTOR if case.timeout else self.wall

    @property
    def total_wall(self) -> float:
        """The wall-clock seconds the whole run may take at its limits (all cases, and their
        custom checker's runs)."""
        if not self.tests:
            return self.wall
        # a custom checker's runs, and its compile (for all its cases, once) beside the program's
        checking = CHECKER_WALL_S * len(self.tests) + COMPILE_TIMEOUT_SECONDS if self.checker.custom else 0.0
        return sum(self.case_wall(case) for case in self.tests) + checking

    @classmethod
    def from_fields(cls, fields: Mapping[str, Any]) -> RunSpec:
        """The spec again from its own `fields()` (a message of ours, checked when it was made)."""
        checker = fields.get("checker")
        if isinstance(checker, dict) and "code" in checker:
            check = Checker("custom", custom=CustomChecker(checker["code"], checker["language"]))
        elif isinstance(checker, dict):
            tolerances = (checker.get("abs_tol", 1e-9), checker.get("rel_tol", 1e-9))
            check = Checker(checker.get("type", "float"), *tolerances)
        else:
            check = Checker(checker or DEFAULT_CHECKER)
        cases = tuple(
            Case(c["name"], c.get("stdin"), tuple(c.get("args") or ()), c.get("expected_output"),
                 c.get("timeout"), c.get("wall_timeout"), c.get("memory_mb"))
            for c in fields.get("tests") or ()
        )  # fmt: skip
        files = tuple(
            SourceFile(f["name"], base64.b64decode(f["content"]) if f.get("encoding") == "base64"
                       else f["content"].encode("utf-8"))
            for f in fields.get("files") or ()
        )  # fmt: skip
        return cls(
            fields["code"], fields["language"], float(fields["timeout"]), fields.get("stdin"),
            tuple(fields.get("args") or ()), fields.get("memory_mb"), fields.get("output_limit"),
            fields.get("wall_timeout"), files, fields.get("entry"), cases, check,
            bool(fields.get("stop_on_first_failure")),
        )  # fmt: skip

    def fields(self) -> dict[str, Any]:
        """As a message's or a request's fields: those left to the default are left out, so a
        message stays readable by workers that predate them (and `entry`, already `code`)."""
        given: dict[str, Any] = {
            "stdin": self.stdin, "args": list(self.args) or None, "memory_mb": self.memory_mb,
            "output_limit": self.output_limit, "wall_timeout": self.wall_timeout,
            "files": [f.to_json() for f in self.files] or None,
            "tests": [case.to_json() for case in self.tests] or None,
            "checker": self.checker.to_json() if self.tests and self.checker != Checker() else None,
            "stop_on_first_failure": True if self.stop_on_first_failure else None,
        }  # fmt: skip
        required = {"code": self.code, "language": self.language, "timeout": self.timeout}
        return {**required, **{name: value for name, value in given.items() if value is not None}}


def parse_run(body: dict[str, Any], bounds: Bounds, languages: Mapping[str, str]) -> RunSpec:
    """The run `body` asks for, or an `InvalidInput`/`TooLarge` naming the first field at fault.
    `languages` maps each language that may be named to its main file's name."""
    language = require_string(body, "language", default="python")
    if language not in languages:
        raise InvalidInput(f"unknown language {language!r}", field="language", known=sorted(languages))
    files = _files(body, bounds, languages[language])
    entry = require_string(body, "entry", default=None)
    if entry is not None:
        chosen = [f for f in files if f.name == entry]
        if not chosen:
            raise InvalidInput(f"field 'entry' must name one of 'files', not {entry[:64]!r}", field="entry")
        if body.get("code") is not None:
            raise InvalidInput("field 'entry': give either 'code' or 'entry', not both", field="entry")
        try:
            code = chosen[0].content.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidInput("field 'entry' must name a UTF-8 text file", field="entry") from None
        files = tuple(f for f in files if f.name != entry)
    else:
        code = require_string(body, "code", max_bytes=bounds.max_code_bytes)
    if not code.strip():
        raise InvalidInput("field 'code' must not be empty", field="entry" if entry else "code")
    timeout = float(
        require_number(
            body, "timeout", default=bounds.default_timeout, low=MIN_TIMEOUT_S, high=bounds.max_timeout
        )
    )
    wall_timeout = require_number(
        body, "wall_timeout", default=None, low=MIN_TIMEOUT_S, high=bounds.max_wall_timeout
    )
    stdin = require_string(body, "stdin", default=None, max_bytes=bounds.max_stdin_bytes)
    args = require_string_list(body, "args", max_items=MAX_ARGS, max_bytes=MAX_ARG_BYTES)
    memory_mb = require_number(
        body, "memory_mb", default=None, low=MIN_MEMORY_MB, high=bounds.max_memory_mb, integer=True
    )
    output_limit = require_number(
        body, "output_limit", default=None, low=MIN_OUTPUT_BYTES, high=bounds.max_output_bytes, integer=True
    )
    tests = _cases(body, bounds)
    checker = _checker(body, languages)  # checked even without cases: no door takes what another refuses
    stop = bool(require_bool(body, "stop_on_first_failure", default=False))
    run = RunSpec(
        code, language, timeout, stdin, tuple(args), memory_mb, output_limit,
        float(wall_timeout) if wall_timeout is not None else None, files, entry, tests, checker, stop,
    )  # fmt: skip
    if run.total_wall > bounds.max_total_wall_s:
        raise InvalidInput(
            f"field 'tests' asks for {run.total_wall:g} s of wall time at its limits; a submission may "
            f"take at most {bounds.max_total_wall_s:g} s (fewer cases, or lower timeouts)",
            field="tests", limit=bounds.max_total_wall_s,
        )  # fmt: skip
    return run


@contextlib.contextmanager
def _within(prefix: str) -> Iterator[None]:
    """Refusals of a nested field name it from the top (`tests[3].timeout`)."""
    try:
        yield
    except Refusal as exc:
        inner = str(exc.details.get("field", ""))
        full = exc.details["field"] = f"{prefix}.{inner}" if inner else prefix
        said = exc.message.replace(f"field '{inner}'", f"field '{full}'")
        exc.message = said if said != exc.message else f"field '{full}': {exc.message}"
        exc.args = (exc.message,)
        raise


def _object_list(body: dict[str, Any], name: str, most: int) -> list[dict[str, Any]]:
    value = body.get(name)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise InvalidInput(f"field '{name}' must be a list of objects", field=name)
    if len(value) > most:
        raise InvalidInput(f"field '{name}' has {len(value)} items; at most {most}", field=name, limit=most)
    return value


def _files(body: dict[str, Any], bounds: Bounds, main_file: str) -> tuple[SourceFile, ...]:
    files: list[SourceFile] = []
    total = 0
    for index, item in enumerate(_object_list(body, "files", bounds.max_files)):
        with _within(f"files[{index}]"):
            name = _path(require_string(item, "name"))
            encoding = require_string(item, "encoding", default="utf-8")
            raw = require_string(item, "content", default="")
            if encoding == "utf-8":
                content = raw.encode("utf-8")
            elif encoding == "base64":
                try:
                    content = base64.b64decode(raw, validate=True)
                except (binascii.Error, ValueError):
                    raise InvalidInput("field 'content' is not valid base64", field="content") from None
            else:
                raise InvalidInput("field 'encoding' must be 'utf-8' or 'base64'", field="encoding")
        top = name.split("/")[0]
        if top in (main_file, BINARY_NAME) or any(f.name == name for f in files):
            reason = "takes the main file's name" if top in (main_file, BINARY_NAME) else "is given twice"
            where = f"files[{index}].name"
            raise InvalidInput(f"field '{where}': file name {name!r} {reason}", field=where)
        if any(other.name.startswith(name + "/") or name.startswith(other.name + "/") for other in files):
            where = f"files[{index}].name"
            raise InvalidInput(f"field '{where}': {name!r} is a file and a folder", field=where)
        total += len(content)
        if total > bounds.max_files_bytes:
            raise TooLarge(f"field 'files' holds over {bounds.max_files_bytes} bytes", field="files",
                           limit=bounds.max_files_bytes)  # fmt: skip
        files.append(SourceFile(name, content))
    return tuple(files)


def _path(name: str) -> str:
    """A relative path inside the working folder: no absolute path, no `..` or `.`, no empty
    part, nothing but printable characters."""
    parts = name.split("/")
    if (
        not name or name.startswith("/") or len(parts) > MAX_PATH_PARTS
        or any(part in ("", ".", "..") or len(part) > MAX_PATH_PART for part in parts)
        or any(ord(ch) < 32 or ch == "\\" for ch in name)
    ):  # fmt: skip
        raise InvalidInput(
            f"field 'name' must be a relative path of at most {MAX_PATH_PARTS} parts, without '..', '.', "
            "empty parts, backslashes or control characters",
            field="name",
        )
    return name


def _cases(body: dict[str, Any], bounds: Bounds) -> tuple[Case, ...]:
    cases = []
    for index, item in enumerate(_object_list(body, "tests", bounds.max_cases)):
        with _within(f"tests[{index}]"):
            name = require_string(item, "name", default=f"case {index + 1}", max_bytes=MAX_CASE_NAME)
            stdin = require_string(item, "stdin", default=None, max_bytes=bounds.max_stdin_bytes)
            args = require_string_list(item, "args", max_items=MAX_ARGS, max_bytes=MAX_ARG_BYTES)
            expected = require_string(item, "expected_output", default=None, max_bytes=bounds.max_stdin_bytes)
            timeout = require_number(
                item, "timeout", default=None, low=MIN_TIMEOUT_S, high=bounds.max_timeout
            )
            wall = require_number(
                item, "wall_timeout", default=None, low=MIN_TIMEOUT_S, high=bounds.max_wall_timeout
            )
            memory = require_number(
                item, "memory_mb", default=None, low=MIN_MEMORY_MB, high=bounds.max_memory_mb, integer=True
            )
        cases.append(Case(
            name, stdin, tuple(args), expected, None if timeout is None else float(timeout),
            None if wall is None else float(wall), memory,
        ))  # fmt: skip
    return tuple(cases)


def _checker(body: dict[str, Any], languages: Mapping[str, str]) -> Checker:
    value = body.get("checker")
    if value is None:
        return Checker()
    if isinstance(value, str):
        if value not in CHECKERS:
            raise InvalidInput(f"field 'checker' must be one of {', '.join(CHECKERS)}, or an object",
                               field="checker", known=list(CHECKERS))  # fmt: skip
        return Checker(value)
    if not isinstance(value, dict):
        raise InvalidInput("field 'checker' must be a name or an object", field="checker")
    with _within("checker"):
        if "code" in value:
            code = require_string(value, "code", max_bytes=64 * 1024)
            language = require_string(value, "language", default="python")
            if language not in languages:
                known = sorted(languages)
                raise InvalidInput(f"unknown language {language!r}", field="language", known=known)
            return Checker("custom", custom=CustomChecker(code, language))
        kind = require_string(value, "type", default="float")
        if kind not in CHECKERS:
            raise InvalidInput(f"field 'type' must be one of {', '.join(CHECKERS)}", field="type")
        abs_tol = require_number(value, "abs_tol", default=1e-9, low=0, high=1e9)
        rel_tol = require_number(value, "rel_tol", default=1e-9, low=0, high=1)
        return Checker(kind, float(abs_tol), float(rel_tol))
