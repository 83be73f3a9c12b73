"""The API's OpenAPI 3 description, served at `/openapi.json` and fuzzed by the test suite.

Written by hand, next to the validation it describes (`evaluations/validation.py`, `app/submission_input.py`):
the test suite runs schemathesis against a live API with it, so a 5xx or an answer that does
not match what is written here fails the build.
"""

from __future__ import annotations

from typing import Any

from evaluations.queue import LEVELS
from evaluations.status import STATUSES
from evaluations.submission_spec import CHECKERS, DEFAULT_CHECKER, MAX_CASE_NAME, MIN_TIMEOUT_S
from evaluations.validation import FALSE_WORDS, MIN_MEMORY_MB, TRUE_WORDS
from infra.settings import Settings

ERROR = {
    "type": "object",
    "required": ["error", "details"],
    "properties": {"error": {"type": "string"}, "details": {"type": "object"}},
}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _answers(ok: dict[str, Any], *errors: int) -> dict[str, Any]:
    """200 with `ok`, then the error statuses, each with the error shape."""
    out: dict[str, Any] = {"200": {"description": "done", "content": _json(ok)}}
    for status in (401, 429, 503, *errors):
        out[str(status)] = {"description": "refused", "content": _json(ERROR)}
    return out


def _eval_id_param() -> dict[str, Any]:
    return {"name": "eval_id", "in": "path", "required": True, "schema": {"type": "string"}}


def openapi_schema(settings: Settings, languages: list[str]) -> dict[str, Any]:
    return {
        "openapi": "3.0.3",
        "info": {"title": "Crucible", "version": "1", "description": "Run untrusted code; read results."},
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            }
        },
        "security": [{"bearer": []}, {"apiKey": []}],
        "paths": {
            **_submission_paths(settings, languages),
            "/api/languages": _languages_path(),
            **_reading_paths(),
            **_admin_paths(),
            "/health": _health_path(),
        },
    }


def _submission(settings: Settings, languages: list[str]) -> dict[str, Any]:
    """POST /api/eval's body."""
    # Optional fields may be null, meaning absent. Limits are in bytes of UTF-8 (413 beyond):
    # a string within maxLength characters may still be refused if its UTF-8 form is longer.
    bounds = settings.submission_bounds
    limit = {"type": "number", "minimum": MIN_TIMEOUT_S, "maximum": settings.max_timeout, "nullable": True}
    wall = {"type": "number", "minimum": MIN_TIMEOUT_S, "maximum": bounds.max_wall_timeout, "nullable": True}
    memory = {"type": "integer", "minimum": MIN_MEMORY_MB, "maximum": settings.memory_limit_mb}
    memory["nullable"] = True
    text = {"type": "string", "maxLength": settings.max_stdin_bytes, "nullable": True}
    args = {"type": "array", "nullable": True, "maxItems": 64,
            "items": {"type": "string", "maxLength": 4096, "pattern": "^[^\\u0000]*$"}}  # fmt: skip
    return {
        "type": "object",
        "anyOf": [{"required": ["code"]}, {"required": ["entry"]}],
        "properties": {
            "code": {"type": "string", "pattern": r"\S", "maxLength": settings.max_code_bytes},
            "entry": {"type": "string", "nullable": True, "description": "which of `files` is the main file"},
            "wall_timeout": {**wall, "description": "wall-clock seconds (default: 3 x timeout, CPU seconds)"},
            "files": {
                "type": "array",
                "nullable": True,
                "maxItems": bounds.max_files,
                "description": "laid out read-only beside the main file; relative paths, no '..'",
                "items": {
                    "type": "object",
                    "required": ["name"],
                    "properties": {
                        "name": {"type": "string", "minLength": 1},
                        "content": {"type": "string", "default": "", "nullable": True},
                        "encoding": {"enum": ["utf-8", "base64", None], "default": "utf-8"},
                    },
                },
            },
            "tests": {
                "type": "array",
                "nullable": True,
                "maxItems": bounds.max_cases,
                "description": "test cases: the program run once for each, its output checked",
                "items": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string", "maxLength": MAX_CASE_NAME, "nullable": True},
                        "stdin": text,
                        "args": args,
                        "expected_output": text,
                        "timeout": limit,
                        "wall_timeout": wall,
                        "memory_mb": memory,
                    },
                },
            },
            "checker": {
                "nullable": True,
                "default": DEFAULT_CHECKER,
                "oneOf": [
                    {"enum": list(CHECKERS)},
                    {"type": "object", "required": ["code"], "properties": {
                        "code": {"type": "string"}, "language": {"type": "string", "nullable": True}}},
                    {"type": "object", "not": {"required": ["code"]}, "properties": {
                        "type": {"enum": list(CHECKERS), "nullable": True},
                        "abs_tol": {"type": "number", "minimum": 0, "maximum": 1e9, "nullable": True},
                        "rel_tol": {"type": "number", "minimum": 0, "maximum": 1, "nullable": True}}},
                ],
            },
            "stop_on_first_failure": {"type": "boolean", "default": False, "nullable": True},
            "language": {"type": "string", "enum": languages, "default": "python", "nullable": True},
            "timeout": {"type": "number", "minimum": 1, "maximum": settings.max_timeout, "nullable": True},
            "memory_mb": {
                "type": "integer",
                "minimum": MIN_MEMORY_MB,
                "maximum": settings.memory_limit_mb,
                "nullable": True,
            },
            "output_limit": {
                "type": "integer",
                "minimum": 1,
                "maximum": settings.output_limit_bytes,
                "nullable": True,
            },
            "priority": {
                "oneOf": [{"type": "boolean"}, {"type": "integer"}],
                "default": False,
                "nullable": True,
                "description": "true: the high queue; a number: 8 and up high, 4-7 default, below 4 low",
            },
            "eval_id": {"type": "string", "pattern": "^[A-Za-z0-9_.-]{1,128}$", "nullable": True},
            "callback_url": {
                "type": "string",
                "maxLength": 2048,
                "nullable": True,
                "description": "where the final result is POSTed, signed; only hosts with global "
                "addresses (422 otherwise)",
            },
            "callback_headers": {
                "type": "object",
                "nullable": True,
                "maxProperties": 5,
                "additionalProperties": {"type": "string", "maxLength": 1024},
                "description": "headers for the webhook: Authorization, X-Api-Key, X-Auth-Token, "
                "X-Request-Id, X-Correlation-Id",
            },
            "stdin": {"type": "string", "maxLength": settings.max_stdin_bytes, "nullable": True},
            "args": {
                "type": "array",
                "nullable": True,
                "items": {"type": "string", "maxLength": 4096, "pattern": "^[^\\u0000]*$"},
                "maxItems": 64,
            },
        },
    }


def _queued() -> dict[str, Any]:
    """The answer to an accepted submission."""
    return {
        "type": "object",
        "required": ["eval_id", "task_id", "status", "message"],
        "properties": {
            "eval_id": {"type": "string"},
            "task_id": {"type": "string"},
            "status": {"const": "queued"},
            "message": {"type": "string"},
            "queue_position": {"type": ["integer", "null"]},
            "queue_system": {"enum": ["dramatiq", "legacy"]},
            "fallback": {"type": "boolean"},
            "warnings": {
                "type": "array",
                "items": {"type": "string"},
                "description": "each field of the request that is not known and was ignored",
            },
        },
    }


def _waited() -> dict[str, Any]:
    """The answer to `?wait=true` when the result did not come in time: the queued answer,
    with the status now."""
    answer = _queued()
    return {**answer, "properties": {**answer["properties"], "status": {"enum": ["queued", "running"]}}}


def _wait_parameters(settings: Settings) -> list[dict[str, Any]]:
    """POST /api/eval's `wait` and `wait_timeout`."""
    flag = {"type": "string", "enum": [*TRUE_WORDS, *FALSE_WORDS]}
    seconds = {"type": "number", "minimum": 0, "exclusiveMinimum": True, "maximum": settings.max_wait_s}
    return [
        {"name": "wait", "in": "query", "schema": flag,
         "description": "true: answer with the result (200) if it comes within wait_timeout, else 202"},
        {"name": "wait_timeout", "in": "query", "schema": seconds,
         "description": "seconds to wait with wait=true (default 10, at most CRUCIBLE_MAX_WAIT_S)"},
    ]  # fmt: skip


def _submission_paths(settings: Settings, languages: list[str]) -> dict[str, Any]:
    """Submitting one evaluation, or a batch of them."""
    batch = {
        "type": "object",
        "required": ["evaluations"],
        "properties": {
            # Each item is checked alone and reported in the answer
            # (queued, or failed with its error), so any object goes.
            "evaluations": {
                "type": "array",
                "items": {"type": "object"},
                "minItems": 1,
                "maxItems": 100,
                "description": "objects shaped like POST /api/eval's body",
            }
        },
    }
    batch_answer = {"type": "object", "required": ["evaluations", "total", "queued", "failed"]}
    return {
        "/api/eval": {
            "post": {
                "summary": "Submit code to evaluate",
                "parameters": _wait_parameters(settings),
                "requestBody": {"required": True, "content": _json(_submission(settings, languages))},
                "responses": {
                    # with ?wait=true, a result in time is answered as GET /api/eval/{eval_id} shows it
                    **_answers({"anyOf": [_queued(), _evaluation()]}, 403, 409, 413, 415, 422),
                    "202": {"description": "not finished within wait_timeout", "content": _json(_waited())},
                },
            }
        },
        "/api/eval-batch": {
            "post": {
                "summary": "Submit up to 100 evaluations (low queue)",
                "requestBody": {"required": True, "content": _json(batch)},
                "responses": _answers(batch_answer, 413, 415, 422),
            }
        },
    }


def _languages_path() -> dict[str, Any]:
    """GET /api/languages."""
    language = {
        "type": "object",
        "required": ["name", "version", "compiled"],
        "properties": {
            "name": {"type": "string"},
            "version": {"type": "string"},
            "compiled": {"type": "boolean"},
        },
    }
    listing = {
        "type": "object",
        "required": ["languages"],
        "properties": {"languages": {"type": "array", "items": language}},
    }
    return {"get": {"summary": "Languages the executors run, with versions", "responses": _answers(listing)}}


def _evaluation() -> dict[str, Any]:
    """One evaluation, as GET /api/eval/{eval_id} shows it."""
    return {
        "type": "object",
        "required": ["eval_id", "status", "success", "created_at"],
        "properties": {
            "eval_id": {"type": "string"},
            "status": {"enum": list(STATUSES)},
            "celery_state": {"enum": ["PENDING", "STARTED", "RETRY", "SUCCESS", "FAILURE", "REVOKED"]},
            "success": {"type": "boolean"},
            "created_at": {"type": "string"},
            "completed_at": {"type": ["string", "null"]},
            "output": {"type": ["string", "null"]},
            "error": {"type": ["string", "null"]},
            "queue": {"enum": [*LEVELS, None]},
        },
    }


def _page() -> list[dict[str, Any]]:
    """The `limit` and `offset` query parameters of a listing."""
    return [
        {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000}},
        {"name": "offset", "in": "query", "schema": {"type": "integer", "minimum": 0}},
    ]


def _reading_paths() -> dict[str, Any]:
    """One evaluation (with its timeline, and cancelling it), and the listing of them."""
    evaluation = _evaluation()
    secret = {
        "type": "object",
        "required": ["key_id", "secret"],
        "properties": {"key_id": {"type": "string"}, "secret": {"type": "string"}},
    }
    return {
        "/api/eval/{eval_id}": {
            "get": {"parameters": [_eval_id_param()], "responses": _answers(evaluation, 404)}
        },
        "/api/eval-status/{eval_id}": {
            "get": {"parameters": [_eval_id_param()], "responses": _answers(evaluation, 404)}
        },
        "/api/eval/{eval_id}/timeline": {
            "get": {
                "parameters": [_eval_id_param()],
                "responses": _answers({"type": "object", "required": ["eval_id", "events"]}, 404),
            }
        },
        "/api/eval/{eval_id}/cancel": _cancel_path(),
        "/api/evaluations": _listing_path(),
        "/api/webhook-secret": {"get": {"responses": _answers(secret)}},
        "/api/webhook-secret/rotate": {"post": {"responses": _answers(secret)}},
    }


def _cancel_path() -> dict[str, Any]:
    """POST /api/eval/{eval_id}/cancel."""
    cancelled = {
        "type": "object",
        "required": ["eval_id", "status", "cancelled", "message"],
        "properties": {"status": {"const": "cancelled"}, "cancelled": {"const": True}},
    }
    terminate = {
        "name": "terminate",
        "in": "query",
        "schema": {"type": "string", "enum": [*TRUE_WORDS, *FALSE_WORDS]},
    }
    return {
        "post": {"parameters": [_eval_id_param(), terminate], "responses": _answers(cancelled, 400, 404, 422)}
    }


def _listing_path() -> dict[str, Any]:
    """GET /api/evaluations: a page of evaluations, filtered."""
    listing = {
        "type": "object",
        "required": ["evaluations", "count", "total", "limit", "offset", "has_more"],
        "properties": {
            "evaluations": {"type": "array", "items": {"type": "object"}},
            "count": {"type": "integer"},
            "total": {"type": "integer"},
            "limit": {"type": "integer"},
            "offset": {"type": "integer"},
            "has_more": {"type": "boolean"},
        },
    }
    filters = [
        {"name": "status", "in": "query", "schema": {"enum": list(STATUSES)}},
        {"name": "language", "in": "query", "schema": {"type": "string"}},
        {"name": "queue", "in": "query", "schema": {"enum": list(LEVELS)}},
        {"name": "q", "in": "query", "schema": {"type": "string"}},
    ]
    return {"get": {"parameters": [*_page(), *filters], "responses": _answers(listing, 422)}}


def _admin_paths() -> dict[str, Any]:
    """The dead-letter queue, for admin keys only (403 for the others)."""
    tasks = {"type": "object", "required": ["tasks", "count", "total"]}
    statistics = {"type": "object", "required": ["queue_size", "exception_breakdown", "task_breakdown"]}
    return {
        "/api/dlq/tasks": {
            "get": {
                "parameters": [*_page(), {"name": "eval_id", "in": "query", "schema": {"type": "string"}}],
                "responses": _answers(tasks, 403, 422),
            }
        },
        "/api/dlq/statistics": {"get": {"responses": _answers(statistics, 403)}},
    }


def _health_path() -> dict[str, Any]:
    """GET /health: open to all (no key), 503 when Redis is down."""
    return {
        "get": {
            "security": [],
            "responses": {
                "200": {"description": "up", "content": _json({"type": "object", "required": ["status"]})},
                "503": {"description": "Redis is down", "content": _json({"type": "object"})},
            },
        }
    }
