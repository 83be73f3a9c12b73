"""Checking untrusted input field by field; each refusal names the field (`InvalidInput`, `TooLarge`)."""

from __future__ import annotations

import math
from typing import Any, TypeVar

from evaluations.errors import InvalidInput, TooLarge

D = TypeVar("D", float, bool, None)

_MISSING: Any = object()
#: Command-line arguments a run may be given.
MAX_ARGS = 64
MAX_ARG_BYTES = 4096
#: How a yes/no is written in query parameters and (any case, spaces around) in settings.
TRUE_WORDS = ("true", "1", "yes", "on")
FALSE_WORDS = ("false", "0", "no", "off")
#: The smallest memory limit a run may ask for (an interpreter needs some to start at all).
MIN_MEMORY_MB = 16


def require_string(
    body: dict[str, Any], name: str, *, default: Any = _MISSING, max_bytes: int | None = None
) -> Any:
    """A string field; absent → `default` (or 422 when there is none)."""
    value = body.get(name, _MISSING)
    if value is _MISSING or value is None:
        if default is _MISSING:
            raise InvalidInput(f"field '{name}' is required", field=name)
        return default
    if not isinstance(value, str):
        raise InvalidInput(f"field '{name}' must be a string", field=name)
    if "\x00" in value and name != "code":
        raise InvalidInput(f"field '{name}' must not contain NUL characters", field=name)
    if max_bytes is not None and len(value.encode("utf-8", errors="surrogatepass")) > max_bytes:
        raise TooLarge(f"field '{name}' is over {max_bytes} bytes", field=name, limit=max_bytes)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInput(f"field '{name}' is not valid UTF-8", field=name) from None
    return value


def require_number(
    body: dict[str, Any], name: str, *, default: D, low: float, high: float, integer: bool = False
) -> float | D:
    """A number field within [low, high]; out of range is refused, never clamped. With
    `integer`, a fraction is refused too (rather than silently rounded)."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int if integer else int | float):
        kind = "a whole number" if integer else "a number"
        raise InvalidInput(f"field '{name}' must be {kind}", field=name)
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        finite = False
    if not finite:
        raise InvalidInput(f"field '{name}' must be a finite number in range", field=name)
    if not low <= value <= high:
        raise InvalidInput(
            f"field '{name}' must be between {low:g} and {high:g}", field=name, low=low, high=high
        )
    return value


def require_bool(body: dict[str, Any], name: str, *, default: D) -> bool | D:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise InvalidInput(f"field '{name}' must be true or false", field=name)
    return value


def require_string_list(body: dict[str, Any], name: str, *, max_items: int, max_bytes: int) -> list[str]:
    """A list of strings (absent → empty), each without NUL and at most `max_bytes`."""
    value = body.get(name)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidInput(f"field '{name}' must be a list of strings", field=name)
    if len(value) > max_items:
        raise InvalidInput(f"field '{name}' has more than {max_items} items", field=name)
    for item in value:
        require_string({name: item}, name, max_bytes=max_bytes)
    return value


def bool_word(raw: str) -> bool | None:
    """True or False for a yes/no word (`TRUE_WORDS`, `FALSE_WORDS`, exactly), None for anything else."""
    if raw in TRUE_WORDS:
        return True
    if raw in FALSE_WORDS:
        return False
    return None
