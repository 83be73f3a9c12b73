"""Bad requests get a 4xx JSON error naming the problem, never a 500."""

from __future__ import annotations

import httpx
import pytest


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({}, 422, "code"),
        ({"code": None}, 422, "code"),
        ({"code": 42}, 422, "code"),
        ({"code": "   "}, 422, "code"),
        ({"code": "print(1)", "language": "cobol"}, 422, "language"),
        ({"code": "print(1)", "language": ["python"]}, 422, "language"),
        ({"code": "print(1)", "timeout": "soon"}, 422, "timeout"),
        ({"code": "print(1)", "timeout": 10**9}, 422, "timeout"),
        ({"code": "print(1)", "timeout": -1}, 422, "timeout"),
        ({"code": "print(1)", "priority": "yes"}, 422, "priority"),
        ({"code": "print(1)", "eval_id": "../../etc/passwd"}, 422, "eval_id"),
        ({"code": "x" * (64 * 1024 + 1)}, 413, "code"),
    ],
)
async def test_invalid_fields_are_named(api: httpx.AsyncClient, body: dict, status: int, field: str) -> None:
    response = await api.post("/api/eval", json=body)
    assert response.status_code == status, response.text
    assert response.json()["details"]["field"] == field
    assert "error" in response.json()


async def test_unknown_language_lists_the_known_ones(api: httpx.AsyncClient) -> None:
    response = await api.post("/api/eval", json={"code": "x", "language": "cobol"})
    assert "python" in response.json()["details"]["known"]


@pytest.mark.parametrize("raw", [b"not json", b"{", b"\xff\xfe", b""])
async def test_body_that_is_not_json(api: httpx.AsyncClient, raw: bytes) -> None:
    response = await api.post("/api/eval", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 422  # as the original (FastAPI) service answered
    assert response.json()["error"] == "request body is not valid JSON"
    assert response.json()["details"]["reason"]  # the parser's words


async def test_truncated_json_is_422_as_the_original_answered(api: httpx.AsyncClient) -> None:
    """The original service's own security test: a body cut off before its closing brace."""
    response = await api.post(
        "/api/eval",
        headers={"Content-Type": "application/json"},
        content='{"code": "print(1)", "language": "python"',
    )
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error", "details"}  # the shape of every refusal
    assert body["error"] == "request body is not valid JSON"
    assert "unexpected end of data" in body["details"]["reason"]


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/api/eval-batch"), ("PUT", "/api/migration"), ("POST", "/api/dlq/tasks/retry-batch")],
)
async def test_every_api_door_that_reads_json_answers_422_to_a_body_that_is_not(
    api: httpx.AsyncClient, method: str, path: str
) -> None:
    response = await api.request(method, path, content=b"{", headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    assert response.json()["error"] == "request body is not valid JSON"


async def test_the_executor_answers_422_to_a_body_that_is_not_json(executor: httpx.AsyncClient) -> None:
    response = await executor.post(
        "/execute", content=b'{"eval_id": "x"', headers={"content-type": "application/json"}
    )
    assert response.status_code == 422, response.text
    assert response.json()["error"] == "request body is not valid JSON"


async def test_a_declared_non_json_body_is_415_not_422(api: httpx.AsyncClient) -> None:
    """Only a body offered as JSON (a JSON type, or none) is parsed; another type is refused unread."""
    response = await api.post("/api/eval", content=b"{", headers={"content-type": "text/plain"})
    assert response.status_code == 415
    assert response.json()["error"] == "request body must be JSON (Content-Type: application/json)"


async def test_a_dlq_batch_that_is_not_a_list_of_ids_or_too_long_is_refused(api: httpx.AsyncClient) -> None:
    not_a_list = await api.post("/api/dlq/tasks/retry-batch", json={"ids": []})
    assert (
        not_a_list.status_code == 422 and not_a_list.json()["error"] == "body must be a JSON list of task ids"
    )
    too_many = await api.post("/api/dlq/tasks/retry-batch", json=["x"] * 101)
    assert too_many.status_code == 413 and too_many.json()["details"] == {"count": 101}


@pytest.mark.parametrize("raw", [b"[1, 2]", b'"code"', b"null"])
async def test_body_that_is_not_an_object(api: httpx.AsyncClient, raw: bytes) -> None:
    response = await api.post("/api/eval", content=raw)
    assert response.status_code == 422


async def test_oversized_body_is_refused_before_parsing(api: httpx.AsyncClient) -> None:
    response = await api.post("/api/eval", content=b"{" + b" " * (2 * 1024 * 1024) + b"}")
    assert response.status_code == 413


async def test_unknown_evaluation_is_404(api: httpx.AsyncClient) -> None:
    for path in ("/api/eval/eval_nope", "/api/eval-status/eval_nope"):
        response = await api.get(path)
        assert response.status_code == 404
        assert response.json()["error"] == "evaluation not found"


@pytest.mark.parametrize(
    "params", [{"limit": "0"}, {"limit": "many"}, {"offset": "-1"}, {"status": "sleeping"}]
)
async def test_bad_listing_parameters(api: httpx.AsyncClient, params: dict) -> None:
    response = await api.get("/api/evaluations", params=params)
    assert response.status_code == 422
    assert response.json()["details"]["field"] in params


async def test_unknown_route_and_wrong_method_are_json(api: httpx.AsyncClient) -> None:
    assert (await api.get("/api/nothing")).json()["error"]
    response = await api.get("/api/eval")
    assert response.status_code == 405
    assert response.json()["error"]


async def test_a_numeric_priority_names_a_level_as_later_platform_versions_send_it(
    api: httpx.AsyncClient,
) -> None:
    levels = {}
    for priority in (10, 5, 1):
        response = await api.post("/api/eval", json={"code": "print(1)", "priority": priority})
        assert response.status_code == 200, response.text
        record = (await api.get(f"/api/eval/{response.json()['eval_id']}")).json()
        levels[priority] = record["queue"]
    assert levels == {10: "high", 5: "default", 1: "low"}
    refused = await api.post("/api/eval", json={"code": "print(1)", "priority": "urgent"})
    assert refused.status_code == 422 and refused.json()["details"]["field"] == "priority"
