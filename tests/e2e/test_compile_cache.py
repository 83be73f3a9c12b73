"""The compile cache (executor/compile_cache.py): a source compiled once runs again without a
compile step, with the same answer; a failed compile is never kept; a new source compiles."""

from __future__ import annotations

import dataclasses

import pytest

from bench.stack import free_uid_base
from evaluations.languages import registry
from executor.app import open_sandbox, request_limits
from executor.compile_cache import CompileCache
from infra.settings import Settings

C = registry("/usr/bin/python3").get("c")
PROGRAM = '#include <stdio.h>\nint main(){int x; scanf("%d", &x); printf("%d\\n", x * 2); return 0;}'

pytestmark = pytest.mark.skipif(C is None, reason="no C compiler on this machine")


async def test_a_compiled_source_is_not_compiled_again() -> None:
    settings = dataclasses.replace(
        Settings.from_env(), executor_concurrency=1, sandbox_uid_base=free_uid_base()
    )
    async with open_sandbox(settings) as box:
        limits = request_limits(settings)
        assert C is not None
        first = await box.run("a", C, PROGRAM, limits, stdin="21")
        again = await box.run("b", C, PROGRAM, limits, stdin="5")
        assert (first.output, again.output) == ("42\n", "10\n")
        assert (len(box.compiled), box.compiled.hits) == (1, 1)
        broken = await box.run("c", C, "int main( {", limits)
        assert broken.status == "compile_error"
        other = await box.run("d", C, PROGRAM.replace("x * 2", "x * 3"), limits, stdin="5")
        assert other.output == "15\n"
        assert (len(box.compiled), box.compiled.hits) == (2, 1)  # the broken one was not kept


def test_least_recently_used_binaries_go_first() -> None:
    cache = CompileCache(max_bytes=10)
    cache.put("a", b"aaaa")
    cache.put("b", b"bbbb")
    assert cache.get("a") == b"aaaa"  # now the most recent
    cache.put("c", b"cccc")
    assert (cache.get("a"), cache.get("b"), cache.get("c")) == (b"aaaa", None, b"cccc")
    cache.put("huge", b"x" * 11)
    assert cache.get("huge") is None
