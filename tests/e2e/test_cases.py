"""Test cases, checkers and files: one submission, many runs, each checked (real sandboxes)."""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from evaluations.api_keys import KeyStore
from evaluations.redis_keys import RedisKeys
from tests.conftest import Stack
from tests.helpers import api_client, make_keys, submit, wait_final

#: A C program: prints twice its input; "crash" dereferences NULL, "spin" never ends, 7 is
#: answered wrong on purpose.
C_DOUBLER = r"""
#include <stdio.h>
#include <string.h>
int main(void) {
    char word[64] = {0};
    if (scanf("%63s", word) != 1) return 2;
    if (strcmp(word, "crash") == 0) { int *p = 0; return *p; }
    if (strcmp(word, "spin") == 0) { volatile unsigned long n = 0; for (;;) n++; }
    long value = 0;
    sscanf(word, "%ld", &value);
    printf("%ld\n", value == 7 ? 15 : value * 2);
    return 0;
}
"""


async def execute(executor: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    answer = await executor.post("/execute", json={"eval_id": f"cases-{uuid.uuid4().hex[:8]}", **body})
    assert answer.status_code == 200, answer.text
    return answer.json()


def statuses(result: dict[str, Any]) -> list[str]:
    return [case["status"] for case in result["cases"]]


async def test_a_c_program_compiles_once_for_twenty_cases_with_verdicts(executor: httpx.AsyncClient) -> None:
    tests = [{"name": f"n{n}", "stdin": str(n), "expected_output": f"{2 * n}\n"} for n in range(1, 19)]
    tests += [{"name": "crash", "stdin": "crash", "expected_output": "0\n"},
              {"name": "spin", "stdin": "spin", "expected_output": "0\n", "timeout": 1}]  # fmt: skip
    code = C_DOUBLER + f"/* {uuid.uuid4().hex} */\n"  # not in the compile cache yet
    result = await execute(executor, code=code, language="c", tests=tests, timeout=2)
    expected = ["accepted"] * 18 + ["runtime_error", "timeout"]
    expected[6] = "wrong_answer"  # n7
    assert statuses(result) == expected, result["cases"]
    assert result["status"] == "completed" and result["verdict"] == "wrong_answer"
    assert (result["passed"], result["total"]) == (17, 20)
    assert result["compile"]["status"] == "completed" and result["compile"]["cached"] is False
    assert result["cases"][6]["checker_message"] == "line 1: expected '14', got '15'"
    assert result["cases"][18]["signal"] == 11 and result["cases"][19]["time_limit"] == "cpu"
    # the same program again: the compile cache serves it, and says so
    again = await execute(executor, code=code, language="c", tests=tests[:2])
    assert again["compile"]["cached"] is True and statuses(again) == ["accepted", "accepted"]


async def test_a_python_program_reads_its_data_files_beside_it(executor: httpx.AsyncClient) -> None:
    blob = bytes(range(256))
    files = [
        {"name": "data/numbers.txt", "content": "3 4 5\n"},
        {"name": "blob.bin", "content": base64.b64encode(blob).decode(), "encoding": "base64"},
        {"name": "helper.py", "content": "def total(xs):\n    return sum(xs)\n"},
    ]
    code = ("from helper import total\n"
            "numbers = map(int, open('data/numbers.txt').read().split())\n"
            "print(total(numbers), len(open('blob.bin', 'rb').read()))\n"
            "try:\n    open('data/numbers.txt', 'w')\n"
            "except OSError as e:\n    print('read-only', e.errno)\n")  # fmt: skip
    result = await execute(executor, code=code, files=files)
    assert result["status"] == "completed", result
    assert result["output"] == "12 256\nread-only 30\n"  # EROFS: the files are the caller's


async def test_an_entry_file_runs_as_the_main_file_with_cases(executor: httpx.AsyncClient) -> None:
    files = [{"name": "solve.py", "content": "from lib import f\nprint(f(int(input())))\n"},
             {"name": "lib.py", "content": "def f(n):\n    return n * n\n"}]  # fmt: skip
    tests = [{"stdin": "3", "expected_output": "9"}, {"stdin": "4", "expected_output": "16\n\n"}]
    result = await execute(executor, entry="solve.py", files=files, tests=tests)
    assert statuses(result) == ["accepted", "accepted"] and result["verdict"] == "accepted"
    assert result["cases"][0]["name"] == "case 1" and "compile" in result and result["compile"] is None


async def test_each_checker(executor: httpx.AsyncClient) -> None:
    code = "print(input())"
    cases = [("1.0000001 x", "1 x"), ("a  b", "a b"), ("a b  \n\n", "a b")]
    tests = [{"stdin": given, "expected_output": expected} for given, expected in cases]
    answers = {}
    for checker in ("exact", "trimmed", "tokens", {"type": "float", "abs_tol": 1e-3}):
        result = await execute(executor, code=code, tests=tests, checker=checker)
        answers[str(checker)] = statuses(result)
    assert answers == {
        "exact": ["wrong_answer", "wrong_answer", "wrong_answer"],
        "trimmed": ["wrong_answer", "wrong_answer", "accepted"],
        "tokens": ["wrong_answer", "accepted", "accepted"],
        "{'type': 'float', 'abs_tol': 0.001}": ["accepted", "accepted", "accepted"],
    }


async def test_a_custom_checker_decides_and_a_broken_one_is_our_error(executor: httpx.AsyncClient) -> None:
    # accepts any output whose number is within 10 of the expected one; says why not
    checker = ("import sys\n"
               "given, output, expected = (open(p).read() for p in sys.argv[1:4])\n"
               "ok = abs(int(output) - int(expected)) <= 10\n"
               "print('close enough' if ok else f'{output.strip()} is far from {expected.strip()}')\n"
               "sys.exit(42 if ok else 43)\n")  # fmt: skip
    tests = [{"stdin": "5", "expected_output": "12"}, {"stdin": "50", "expected_output": "5"}]
    result = await execute(executor, code="print(int(input()) * 2)", tests=tests,
                           checker={"code": checker, "language": "python"})  # fmt: skip
    assert statuses(result) == ["accepted", "wrong_answer"]
    assert [c["checker_message"] for c in result["cases"]] == ["close enough", "100 is far from 5"]
    # a checker that raised (Python exits 1 then) fails: it does not call the answer wrong
    broken = await execute(executor, code="print(1)", tests=tests[:1],
                           checker={"code": "raise ValueError('a bug')", "language": "python"})  # fmt: skip
    assert broken["status"] == "failed" and broken["internal_error"] is True
    said = broken["cases"][0]["checker_message"]
    assert broken["verdict"] == "checker_error" and "exit code 1" in said and "ValueError: a bug" in said


async def test_stop_on_first_failure_skips_the_rest(executor: httpx.AsyncClient) -> None:
    tests = [{"stdin": "1", "expected_output": "1"}, {"stdin": "2", "expected_output": "3"},
             {"stdin": "3", "expected_output": "3"}]  # fmt: skip
    result = await execute(executor, code="print(input())", tests=tests, stop_on_first_failure=True)
    assert statuses(result) == ["accepted", "wrong_answer", "skipped"]
    assert result["passed"] == 1 and result["verdict"] == "wrong_answer"


async def test_wall_and_cpu_limits_are_apart_and_each_verdict_says_which(executor: httpx.AsyncClient) -> None:
    code = "import sys, time\nif input() == 'sleep':\n    time.sleep(30)\nelse:\n    while True: pass\n"
    tests = [{"name": "sleeps", "stdin": "sleep", "wall_timeout": 1.5},
             {"name": "spins", "stdin": "spin", "timeout": 1, "wall_timeout": 20}]  # fmt: skip
    result = await execute(executor, code=code, tests=tests, timeout=5)
    sleeps, spins = result["cases"]
    assert sleeps["status"] == spins["status"] == "timeout"
    assert sleeps["time_limit"] == "wall" and sleeps["runtime_ms"] < 5000  # not 3 x its 5 s CPU limit
    assert spins["time_limit"] == "cpu" and 900 <= spins["cpu_ms"] < 3000
    assert "Wall-clock time limit of 1.5s" in sleeps["error"] and "CPU time limit of 1s" in spins["error"]


async def test_each_case_is_a_fresh_sandbox(executor: httpx.AsyncClient) -> None:
    code = ("import os\nseen = os.path.exists('/tmp/mark')\nopen('/tmp/mark', 'w').write('x')\n"
            "print('seen' if seen else 'fresh')\n")  # fmt: skip
    result = await execute(executor, code=code, tests=[{"expected_output": "fresh"}] * 3)
    assert statuses(result) == ["accepted"] * 3


async def test_through_the_api_the_result_holds_the_cases(api: httpx.AsyncClient) -> None:
    tests = [{"name": "one", "stdin": "1", "expected_output": "2"},
             {"name": "two", "stdin": "2", "expected_output": "5"}]  # fmt: skip
    eval_id = await submit(api, "print(int(input()) * 2)", tests=tests)
    result = await wait_final(api, eval_id)
    assert result["status"] == "completed" and result["verdict"] == "wrong_answer"
    assert (result["passed"], result["total"]) == (1, 2)
    assert [c["status"] for c in result["cases"]] == ["accepted", "wrong_answer"]
    plain = await wait_final(api, await submit(api, "print(1)"))
    assert "cases" not in plain and "verdict" not in plain  # without tests, the answer is as it was
    refused = await api.post("/api/eval", json={"code": "x", "tests": [{"timeout": 0.1}]})
    assert refused.status_code == 422 and refused.json()["details"]["field"] == "tests[0].timeout"
    refused = await api.post("/api/eval", json={"code": "x", "files": [{"name": "../x", "content": ""}]})
    assert refused.status_code == 422 and refused.json()["details"]["field"] == "files[0].name"


async def test_a_cancel_stops_the_cases_to_come(api: httpx.AsyncClient, executor: httpx.AsyncClient) -> None:
    tests = [{"name": f"slow {n}", "stdin": str(n)} for n in range(6)]  # 6 x 3 s if left to run
    eval_id = await submit(api, "import time\ntime.sleep(3)\nprint(input())", tests=tests)
    for _ in range(200):
        if (await api.get(f"/api/eval/{eval_id}")).json()["status"] == "running":
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(1)
    cancelled = await api.post(f"/api/eval/{eval_id}/cancel", params={"terminate": "true"})
    assert cancelled.status_code == 200, cancelled.text
    started = time.monotonic()
    while any(r["eval_id"] == eval_id for r in (await executor.get("/running")).json()["running"]):
        assert time.monotonic() - started < 3, "the cases went on after the cancel"
        await asyncio.sleep(0.05)
    assert (await wait_final(api, eval_id))["status"] == "cancelled"


async def test_a_keys_rate_counts_the_cases_that_ran(shared_stack: Stack, aredis: aioredis.Redis) -> None:
    """A submission pays one token when it is taken, and owes one more for each further case
    that ran, paid at the key's next submission: a standard key (burst 20) then has 14 left,
    not 19."""
    (secret,) = await make_keys(aredis, shared_stack.namespace, "standard")
    key_id = (await KeyStore(aredis, shared_stack.namespace).lookup(secret)).id
    bucket = RedisKeys(shared_stack.namespace).bucket(key_id)
    tests = [{"stdin": str(n), "expected_output": str(n)} for n in range(6)]
    async with api_client(shared_stack.api_url, key=secret) as api:
        result = await wait_final(api, await submit(api, "print(input())", tests=tests))
        assert result["passed"] == 6
        assert float(await aredis.hget(bucket, "debt")) == pytest.approx(5)
        await asyncio.sleep(0.6)  # the first token back: the bucket is full again
        answer = await api.post("/api/eval", json={"code": "print(1)"})
    assert answer.status_code == 200 and int(answer.headers["RateLimit-Remaining"]) == 20 - 5 - 1
    assert float(await aredis.hget(bucket, "debt")) == 0
