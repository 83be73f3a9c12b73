"""One shape for an evaluation everywhere, and nothing a caller sent silently dropped.

A misspelt field is still accepted (old callers send extras), but named in `warnings`; the
server-sent events carry numbers and flags as `GET` shows them; wall time keeps its fraction.
"""

from __future__ import annotations

import json

import httpx

from tests.helpers import execute, submit, wait_final

#: Fields both `GET /api/eval/{id}` and the final status event carry.
TYPED_FIELDS = ("exit_code", "signal", "runtime_ms", "cpu_ms", "peak_memory_kb", "output_truncated",
                "error_truncated")  # fmt: skip


async def test_unknown_fields_are_accepted_and_named_in_warnings(api: httpx.AsyncClient) -> None:
    answer = await api.post("/api/eval", json={"code": "print(1)", "tiemout": 5, "engine": "celery"})
    assert answer.status_code == 200, answer.text
    assert answer.json()["warnings"] == [
        "field 'tiemout' is not known and was ignored (did you mean 'timeout'?)",
        "field 'engine' is not known and was ignored",
    ]
    many = await api.post("/api/eval", json={"code": "print(1)", **{f"extra{n}": n for n in range(5000)}})
    assert len(many.json()["warnings"]) == 11  # ten named, then how many more
    assert many.json()["warnings"][-1] == "and 4990 more unknown fields were ignored"
    misspelt_code = await api.post("/api/eval", json={"cod": "print(1)"})
    assert misspelt_code.status_code == 422
    assert misspelt_code.json()["error"] == (
        "field 'code' is required; 'cod' is not a known field (did you mean 'code'?)"
    )
    clean = await api.post("/api/eval", json={"code": "print(1)", "timeout": 5})
    assert clean.json()["warnings"] == []
    items = [{"code": "print(1)", "langauge": "python"}, {"code": "print(2)"}]
    batch = await api.post("/api/eval-batch", json={"evaluations": items})
    first, second = batch.json()["evaluations"]
    assert first["warnings"] == ["field 'langauge' is not known and was ignored (did you mean 'language'?)"]
    assert second["warnings"] == []


async def test_the_final_event_has_the_types_get_has(api: httpx.AsyncClient) -> None:
    for code in ("print('hello')", "import sys; sys.exit(3)"):
        eval_id = await submit(api, code)
        got = await wait_final(api, eval_id)
        async with api.stream("GET", f"/api/eval/{eval_id}/events") as stream:
            events = [json.loads(line[6:]) async for line in stream.aiter_lines() if line[:6] == "data: "]
        final = events[-1]
        assert final["status"] == got["status"]
        for name in TYPED_FIELDS:
            assert final[name] == got[name] and type(final[name]) is type(got[name]), (name, final, got)
        assert isinstance(got["output_truncated"], bool) and isinstance(got["exit_code"], int)
        # the timeline is the same list the stream sent
        timeline = (await api.get(f"/api/eval/{eval_id}/timeline")).json()["events"]
        assert timeline[-1] == final


async def test_wall_time_keeps_its_fraction(api: httpx.AsyncClient) -> None:
    got = await wait_final(api, await submit(api, "print('hello')"))
    assert isinstance(got["runtime_ms"], float) and got["runtime_ms"] > 0
    assert isinstance(got["cpu_ms"], int)


async def test_a_time_limit_message_starts_the_error_when_the_program_wrote_only_blank_lines(
    executor: httpx.AsyncClient,
) -> None:
    result = await execute(executor, "import sys\nsys.stderr.write('\\n\\n')\nwhile True: pass", timeout=1)
    assert result["status"] == "timeout"
    assert result["error"] == "CPU time limit of 1s exceeded"
    wrote = await execute(executor, "import sys\nsys.stderr.write('oops\\n')\nwhile True: pass", timeout=1)
    assert wrote["error"] == "oops\nCPU time limit of 1s exceeded"
