"""What a submission may ask for, checked the same way at both doors (the HTTP API and the
Celery shim), so neither accepts what the other refuses and nothing invalid reaches a worker.
"""

from __future__ import annotations

import difflib
import os
import re
import time
from collections.abc import Mapping
from typing import Any

from app.submission import Submission
from evaluations.errors import InvalidInput
from evaluations.languages import registry
from evaluations.queue import level_of_priority
from evaluations.submission_spec import RUN_FIELDS, parse_run
from evaluations.validation import require_string
from evaluations.webhooks import parse_callback
from infra.settings import Settings

#: No ':' — it separates parts of Redis keys ("{ns}:eval:{id}:events").
EVAL_ID_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")


def new_eval_id() -> str:
    """`eval_{YYYYmmdd_HHMMSS}_{8 hex}`, as the original platform made them."""
    return f"eval_{time.strftime('%Y%m%d_%H%M%S', time.gmtime())}_{os.urandom(4).hex()}"


def offered_languages(settings: Settings) -> dict[str, str]:
    """The languages a submission may name (those installed for the executors' sandbox), each
    with its main file's name."""
    return {name: language.file_name for name, language in sorted(registry(settings.python_path).items())}


#: The fields a submission may hold; any other is ignored, and named in the answer's `warnings`.
SUBMISSION_FIELDS = (*RUN_FIELDS, "eval_id", "priority", "callback_url", "callback_headers")
#: A body may hold thousands of unknown fields: the answer names this many.
MAX_WARNINGS = 10


def unknown_fields(body: dict[str, Any]) -> list[str]:
    return [name for name in body if name not in SUBMISSION_FIELDS]


def ignored_fields(body: dict[str, Any]) -> list[str]:
    """A warning for each field of `body` that nothing reads (at most `MAX_WARNINGS`, then how
    many more). Unknown fields are accepted (old callers send extras such as `engine`), but a
    misspelt one would otherwise go unnoticed."""
    unknown = unknown_fields(body)
    warnings = []
    for name in unknown[:MAX_WARNINGS]:
        # a likely misspelling is short; a long name is not compared (difflib is quadratic)
        close = difflib.get_close_matches(name, SUBMISSION_FIELDS, n=1) if len(name) <= 32 else []
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        warnings.append(f"field {name[:64]!r} is not known and was ignored{hint}")
    if len(unknown) > MAX_WARNINGS:
        warnings.append(f"and {len(unknown) - MAX_WARNINGS} more unknown fields were ignored")
    return warnings


def parse_submission(body: dict[str, Any], settings: Settings, languages: Mapping[str, str]) -> Submission:
    """The submission `body` asks for, or a Refusal naming the first field at fault."""
    if "code" not in body:  # a misspelt `code` is ignored like any unknown field: say which
        if close := difflib.get_close_matches("code", unknown_fields(body)[:MAX_WARNINGS], n=1):
            said = f"field 'code' is required; {close[0][:64]!r} is not a known field (did you mean 'code'?)"
            raise InvalidInput(said, field="code")
    run = parse_run(body, settings.submission_bounds, languages)
    eval_id = require_string(body, "eval_id", default=None)
    if eval_id is not None and not EVAL_ID_PATTERN.match(eval_id):
        raise InvalidInput("field 'eval_id' must be 1-128 letters, digits or _.-", field="eval_id")
    level = priority_level(body)
    return Submission(eval_id or new_eval_id(), run, level == "high", level, parse_callback(body))


def priority_level(body: dict[str, Any]) -> str:
    """`priority` as a level: true/false (high/default), or a number as later versions of the
    platform send it, mapped by `evaluations.queue.level_of_priority` (8+ high, 4-7 default,
    below low)."""
    value = body.get("priority", False)
    if value is None or isinstance(value, bool):
        return "high" if value else "default"
    if isinstance(value, int):
        return level_of_priority(value)
    raise InvalidInput("field 'priority' must be true, false or a whole number", field="priority")
