"""Languages from the registry, stdin and arguments, and each verdict with its measurements."""

from __future__ import annotations

import uuid
from collections.abc import Iterable

import httpx
import pytest
import redis.asyncio as aioredis

from evaluations.api_keys import KeyStore
from evaluations.languages import registry
from tests.conftest import Stack
from tests.helpers import api_client, submit, wait_final
from tests.helpers import execute as run

#: What the executor offers here: the languages whose toolchains are installed under /usr.
OFFERED = registry("/usr/bin/python3")
#: Offered only where their Debian packages are installed (golang-go, rustc); every other
#: language below must be here, and its tests run.
OPTIONAL = {"go", "rust"}


def present(languages: Iterable[str]) -> list[str]:
    """The languages of `languages` to test here: the optional ones only where installed."""
    return sorted(name for name in languages if name in OFFERED or name not in OPTIONAL)


HELLO = {
    "python": "import sys\nprint('hello', sys.argv[1:], input())",
    "javascript": "const line = require('fs').readFileSync(0, 'utf8').trim();\n"
    "console.log('hello', JSON.stringify(process.argv.slice(2)), line);",
    "bash": 'read line\necho hello "$@" "$line"',
    "c": "#include <stdio.h>\nint main(int c, char**v){char b[64]; fgets(b,64,stdin);"
    ' printf("hello %s %s", v[1], b); return 0;}',
    "cpp": "#include <iostream>\n#include <string>\nint main(int c, char**v){std::string s;"
    ' std::getline(std::cin, s); std::cout << "hello " << v[1] << " " << s << std::endl;}',
    "java": "import java.util.Scanner;\npublic class Main { public static void main(String[] args) {"
    ' System.out.println("hello " + args[0] + " " + new Scanner(System.in).nextLine()); } }',
    "go": 'package main\nimport ("bufio"; "fmt"; "os")\nfunc main() {'
    ' line, _ := bufio.NewReader(os.Stdin).ReadString(10); fmt.Printf("hello %s %s", os.Args[1], line) }',
    "rust": "use std::io::BufRead;\nfn main() { let mut line = String::new();"
    " std::io::stdin().lock().read_line(&mut line).unwrap();"
    ' print!("hello {} {}", std::env::args().nth(1).unwrap(), line); }',
}
EXPECTED = {
    "python": "hello ['one'] from stdin\n",
    "javascript": 'hello ["one"] from stdin\n',
    "bash": "hello one from stdin\n",
    "c": "hello one from stdin\n",
    "cpp": "hello one from stdin\n",
    "java": "hello one from stdin\n",
    "go": "hello one from stdin\n",
    "rust": "hello one from stdin\n",
}


@pytest.mark.parametrize("language", present(HELLO))
async def test_each_language_runs_with_stdin_and_arguments(
    executor: httpx.AsyncClient, language: str
) -> None:
    result = await run(executor, HELLO[language], language=language, stdin="from stdin\n", args=["one"])
    assert result["status"] == "completed", result
    assert result["output"] == EXPECTED[language]
    assert result["runtime_ms"] > 0 and result["cpu_ms"] > 0 and result["peak_memory_kb"] > 0


async def test_languages_are_listed_with_versions(executor: httpx.AsyncClient) -> None:
    languages = {entry["name"]: entry for entry in (await executor.get("/languages")).json()["languages"]}
    # exactly what is installed under /usr: a toolchain elsewhere (rustup's in a home folder) is not
    assert set(languages) == set(OFFERED) >= {"python", "javascript", "bash", "c", "cpp", "java"}
    assert languages["python"]["version"].startswith("Python 3")
    assert languages["c"]["compiled"] is True and "gcc" in languages["c"]["version"]
    assert languages["java"]["compiled"] is True and languages["java"]["version"].startswith("openjdk ")


def java_main(body: str, imports: str = "") -> str:
    return f"{imports}public class Main {{ public static void main(String[] args) {{ {body} }} }}"


#: For each compiled language but C's (tested above and below): a program for each verdict, and
#: words its answer's error holds. A full JVM heap (-Xmx, under the limit) ends the JVM itself;
#: Go and Rust programs meet the cgroup's or the address-space limit.
VERDICTS: dict[str, dict[str, tuple[str, str]]] = {
    "java": {
        "compile_error": (java_main('int x = "s";'), "error: incompatible types"),
        "failed": (java_main('throw new IllegalStateException("boom");'),
                   'Exception in thread "main" java.lang.IllegalStateException: boom'),
        "timeout": (java_main("long i = 0; while (true) i++;"), "CPU time limit of 1s exceeded"),
        "memory_limit_exceeded": (
            java_main("List<long[]> l = new ArrayList<>(); while (true) l.add(new long[1 << 20]);",
                      "import java.util.*;\n"),
            "java.lang.OutOfMemoryError: Java heap space"),
    },
    "go": {
        "compile_error": ('package main\nfunc main() { var x int = "s"; _ = x }', "cannot use"),
        "failed": ('package main\nfunc main() { panic("boom") }', "panic: boom"),
        "timeout": ("package main\nfunc main() { for {} }", "CPU time limit of 1s exceeded"),
        "memory_limit_exceeded": (
            "package main\nvar kept [][]byte\nfunc main() { for {"
            " b := make([]byte, 1 << 20); for i := range b { b[i] = 1 }; kept = append(kept, b) } }",
            "Memory limit of 128 MB exceeded"),
    },
    "rust": {
        "compile_error": ('fn main() { let x: i32 = "s"; }', "error[E0308]"),
        "failed": ('fn main() { panic!("boom"); }', "boom"),
        "timeout": (
            "fn main() { let mut i = 0u64; loop { unsafe { std::ptr::write_volatile(&mut i, i + 1) } } }",
            "CPU time limit of 1s exceeded"),
        "memory_limit_exceeded": (
            "fn main() { let mut kept = Vec::new(); loop { kept.push(vec![1u8; 1 << 20]); } }",
            "Memory limit of 128 MB exceeded"),
    },
}  # fmt: skip


@pytest.mark.parametrize(
    ("language", "status"), [(lang, status) for lang in present(VERDICTS) for status in VERDICTS[lang]]
)
async def test_each_compiled_language_has_each_verdict(
    executor: httpx.AsyncClient, language: str, status: str
) -> None:
    code, said = VERDICTS[language][status]
    timeout = 1 if status == "timeout" else 10
    result = await run(executor, code, language=language, timeout=timeout, memory_mb=128)
    assert result["status"] == status, result
    assert said in result["error"], result["error"]
    if status == "compile_error":
        assert result["output"] == ""


async def test_a_java_program_compiles_once_for_its_cases_with_a_class_beside_it(
    executor: httpx.AsyncClient,
) -> None:
    """The compile step builds Main and the classes it uses from files beside it; each case runs
    the one jar in a sandbox of its own."""
    code = f"// {uuid.uuid4().hex}\n" + java_main(
        "System.out.println(Twice.of(new Scanner(System.in).nextInt()));", "import java.util.Scanner;\n"
    )
    files = [{"name": "Twice.java", "content": "class Twice { static long of(long n) { return 2 * n; } }"}]
    tests = [{"stdin": "21", "expected_output": "42\n"}, {"stdin": "5", "expected_output": "11\n"}]
    body = {"eval_id": f"java-cases-{uuid.uuid4().hex[:8]}", "code": code, "language": "java", "files": files,
            "tests": tests}  # fmt: skip
    answer = await executor.post("/execute", json=body)
    assert answer.status_code == 200, answer.text
    result = answer.json()
    assert [case["status"] for case in result["cases"]] == ["accepted", "wrong_answer"], result
    assert result["compile"]["status"] == "completed" and result["compile"]["cached"] is False
    assert (result["passed"], result["total"], result["verdict"]) == (1, 2, "wrong_answer")
    # the same program again: the compile cache serves the jar
    repeat = {**body, "eval_id": f"{body['eval_id']}-again", "tests": tests[:1]}
    again = (await executor.post("/execute", json=repeat)).json()
    assert again["compile"]["cached"] is True and [case["status"] for case in again["cases"]] == ["accepted"]


async def test_compile_error_is_its_own_verdict(executor: httpx.AsyncClient) -> None:
    result = await run(executor, "int main( { return 0; }", language="c")
    assert result["status"] == "compile_error"
    assert "error" in result["error"] and result["output"] == ""


@pytest.mark.parametrize(
    ("code", "language", "status", "exit_code", "signal"),
    [
        ("import sys; sys.exit(3)", "python", "failed", 3, None),
        ("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)", "python", "failed", None, 11),
        ("int main(){int *p = 0; return *p;}", "c", "failed", None, 11),
        ("print('fine')", "python", "completed", 0, None),
    ],
)
async def test_exit_codes_and_signals(
    executor: httpx.AsyncClient,
    code: str,
    language: str,
    status: str,
    exit_code: int | None,
    signal: int | None,
) -> None:
    result = await run(executor, code, language=language)
    assert (result["status"], result["signal"]) == (status, signal), result
    if exit_code is not None:
        assert result["exit_code"] == exit_code


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("memory_mb", 10**6),
        ("output_limit", 10**9),
        ("timeout", 10**4),
        ("args", "not a list"),
        ("args", [1]),
    ],
)
async def test_limits_over_the_maximum_are_refused_not_clamped(
    executor: httpx.AsyncClient, field: str, value: object
) -> None:
    response = await executor.post("/execute", json={"eval_id": "x", "code": "print(1)", field: value})
    assert response.status_code == 422 and response.json()["details"]["field"] == field


async def test_stdin_args_and_new_verdicts_through_the_api(api: httpx.AsyncClient) -> None:
    echoed = await wait_final(
        api, await submit(api, "import sys; print(sys.argv[1], input())", stdin="in\n", args=["arg"])
    )
    assert echoed["output"] == "arg in\n" and echoed["peak_memory_kb"] > 0 and echoed["cpu_ms"] > 0
    bomb = await wait_final(api, await submit(api, "x = []\nwhile True:\n    x.append(bytearray(10**7))"))
    assert bomb["status"] == "memory_limit_exceeded" and bomb["celery_state"] == "SUCCESS"
    broken = await wait_final(api, await submit(api, "int main( {", language="c"))
    assert broken["status"] == "compile_error"
    bad = await api.post("/api/eval", json={"code": "print(1)", "args": [1, 2]})
    assert bad.status_code == 422 and bad.json()["details"]["field"] == "args"


async def test_memory_and_output_limits_per_request_through_the_api(api: httpx.AsyncClient) -> None:
    allocation = await wait_final(api, await submit(api, "x = bytearray(200 * 10**6)", memory_mb=64))
    assert allocation["status"] == "memory_limit_exceeded", allocation
    assert "Memory limit of 64 MB exceeded" in allocation["error"]
    capped = await wait_final(api, await submit(api, "print('x' * 100)", output_limit=10))
    assert capped["status"] == "completed" and capped["output"] == "x" * 10 and capped["output_truncated"]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("memory_mb", 10**6),
        ("memory_mb", 8),
        ("memory_mb", 64.5),
        ("output_limit", 10**9),
        ("output_limit", 0),
    ],
)
async def test_api_limits_out_of_range_are_refused_naming_the_field(
    api: httpx.AsyncClient, field: str, value: object
) -> None:
    response = await api.post("/api/eval", json={"code": "print(1)", field: value})
    assert response.status_code == 422 and response.json()["details"]["field"] == field
    batch = await api.post("/api/eval-batch", json={"evaluations": [{"code": "print(1)", field: value}]})
    assert batch.json()["evaluations"][0]["field"] == field and batch.json()["failed"] == 1


async def test_any_key_lists_the_executors_languages_through_the_api(
    shared_stack: Stack, aredis: aioredis.Redis
) -> None:
    _, standard = await KeyStore(aredis, shared_stack.namespace).create("languages", "standard")
    url = shared_stack.api_url
    async with api_client(url, standard) as user, api_client(url, None) as anon:
        response = await user.get("/api/languages")
        assert (await anon.get("/api/languages")).status_code == 401
    assert response.status_code == 200, response.text
    languages = {entry["name"]: entry for entry in response.json()["languages"]}
    assert set(languages) == set(OFFERED)
    assert languages["python"]["version"].startswith("Python 3") and languages["python"]["compiled"] is False
    assert languages["cpp"]["compiled"] is True
