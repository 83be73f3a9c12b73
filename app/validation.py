"""Reading untrusted JSON bodies field by field; each failure names the field (HTTP 4xx)."""

from __future__ import annotations

import math
from typing import Any, TypeVar

from starlette.requests import Request

from app import json_codec
from app.errors import RequestError

D = TypeVar("D", float, bool, None)

_MISSING: Any = object()
#: Largest request body read at all; bigger bodies are refused before parsing.
MAX_BODY_BYTES = 2 * 1024 * 1024
#: Command-line arguments a run may be given.
MAX_ARGS = 64
MAX_ARG_BYTES = 4096
#: The smallest memory limit a run may ask for (an interpreter needs some to start at all).
MIN_MEMORY_MB = 16


async def read_json(request: Request, max_bytes: int = MAX_BODY_BYTES) -> Any:
    """The body parsed as JSON, or a 4xx saying why not (a declared non-JSON type: 415)."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type and media_type != "application/json" and not media_type.endswith("+json"):
        raise RequestError(415, "request body must be JSON (Content-Type: application/json)")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise RequestError(413, f"request body over {max_bytes} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise RequestError(413, f"request body over {max_bytes} bytes")
    try:
        return json_codec.loads(body)
    except json_codec.JSONDecodeError as exc:  # also deep nesting, invalid UTF-8, lone surrogates
        raise RequestError(400, "request body is not valid JSON", reason=str(exc)[:200]) from None


async def read_json_object(request: Request, max_bytes: int = MAX_BODY_BYTES) -> dict[str, Any]:
    """The body as a JSON object, or a 4xx saying why not."""
    data = await read_json(request, max_bytes)
    if not isinstance(data, dict):
        raise RequestError(422, "request body must be a JSON object")
    return data


def require_string(
    body: dict[str, Any], name: str, *, default: Any = _MISSING, max_bytes: int | None = None
) -> Any:
    """A string field; absent → `default` (or 422 when there is none)."""
    value = body.get(name, _MISSING)
    if value is _MISSING or value is None:
        if default is _MISSING:
            raise RequestError(422, f"field '{name}' is required", field=name)
        return default
    if not isinstance(value, str):
        raise RequestError(422, f"field '{name}' must be a string", field=name)
    if "\x00" in value and name != "code":
        raise RequestError(422, f"field '{name}' must not contain NUL characters", field=name)
    if max_bytes is not None and len(value.encode("utf-8", errors="surrogatepass")) > max_bytes:
        raise RequestError(413, f"field '{name}' is over {max_bytes} bytes", field=name, limit=max_bytes)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError(422, f"field '{name}' is not valid UTF-8", field=name) from None
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
        raise RequestError(422, f"field '{name}' must be {kind}", field=name)
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        finite = False
    if not finite:
        raise RequestError(422, f"field '{name}' must be a finite number in range", field=name)
    if not low <= value <= high:
        raise RequestError(
            422, f"field '{name}' must be between {low:g} and {high:g}", field=name, low=low, high=high
        )
    return value


def require_bool(body: dict[str, Any], name: str, *, default: D) -> bool | D:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise RequestError(422, f"field '{name}' must be true or false", field=name)
    return value


def require_string_list(body: dict[str, Any], name: str, *, max_items: int, max_bytes: int) -> list[str]:
    """A list of strings (absent → empty), each without NUL and at most `max_bytes`."""
    value = body.get(name)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RequestError(422, f"field '{name}' must be a list of strings", field=name)
    if len(value) > max_items:
        raise RequestError(422, f"field '{name}' has more than {max_items} items", field=name)
    for item in value:
        require_string({name: item}, name, max_bytes=max_bytes)
    return value
