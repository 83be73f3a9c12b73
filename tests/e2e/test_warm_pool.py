"""Warm sandboxes (executor/warm.py): a pre-started Python sandbox answers as a cold start
would, serves exactly one run, and never turns a failure of ours into the submission's."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import pytest

from bench.stack import free_uid_base
from evaluations.languages import registry
from evaluations.settings import Settings
from executor import warm_pool
from executor.app import open_sandbox, request_limits
from executor.sandbox import Sandbox
from executor.verdict import RunResult
from executor.warm import LOADER

PYTHON = "/usr/bin/python3"
PROGRAMS = {
    "hello": "print('hello world')",
    "exit code": "import sys; sys.exit(3)",
    "exception": "def f():\n    raise ValueError('boom')\nf()",
    "one-liner error": "1/0",
    "syntax error": "x = (",
    "as a script": "import sys; print(__name__, __file__, sys.argv, sys.path[0])",
    "stderr and unicode": "import sys; print('héllo ✓'); print('warn', file=sys.stderr)",
    "inspect": "import inspect\ndef f():\n    return 1\nprint(inspect.getsource(f))",
    "custom excepthook": "import sys\nsys.excepthook = lambda *a: print('hooked', a[0])\nraise KeyError(1)",
}


def uids_in_use(uids: Sequence[int]) -> list[str]:
    """Processes on the host running as one of `uids` (a sandbox's own: see executor/uid_range.py)."""
    ps = subprocess.run(["ps", "-ww", "-eo", "uid=,pid=,args="], capture_output=True, text=True).stdout
    return [line for line in ps.splitlines() if int(line.split()[0]) in uids]


@asynccontextmanager
async def sandbox(warm: bool, slots: int = 2) -> AsyncIterator[Sandbox]:
    settings = dataclasses.replace(
        Settings.from_env(),
        sandbox_warm_pool=warm,
        executor_concurrency=slots,
        sandbox_uid_base=free_uid_base(),
    )
    async with open_sandbox(settings) as box:
        box.limits = request_limits(settings, {})  # type: ignore[attr-defined]
        yield box


async def run(box: Sandbox, name: str, code: str, **options: object) -> RunResult:
    python = registry("/usr/bin/python3")["python"]
    limits = dataclasses.replace(box.limits, **options.pop("limits", {}))  # type: ignore[attr-defined,arg-type]
    result = await box.run(name, python, code, limits, **options)  # type: ignore[arg-type]
    await asyncio.sleep(0.2)  # the slot's next warm sandbox starts after the answer
    return result


def answer(result: RunResult) -> tuple[object, ...]:
    return result.status, result.exit_code, result.signal, result.output, result.error


async def test_a_warm_run_answers_as_a_cold_one() -> None:
    async with sandbox(warm=True) as warm, sandbox(warm=False) as cold:
        assert warm.warm == 2 and cold.warm == 0
        for name, code in PROGRAMS.items():
            assert answer(await run(warm, "w", code)) == answer(await run(cold, "c", code)), name
            assert warm.warm == 2  # it was used, and replaced


async def test_each_warm_sandbox_serves_exactly_one_run() -> None:
    async with sandbox(warm=True, slots=1) as box:
        first = await run(box, "a", "import os; open('/tmp/mark', 'w').write('x'); print(os.listdir('/tmp'))")
        second = await run(box, "b", "import os; print(os.listdir('/tmp'))")
        assert (first.output, second.output) == ("['mark']\n", "[]\n")
        assert box.warm == 1


async def test_a_dead_warm_sandbox_means_a_cold_start_not_a_failure() -> None:
    async with sandbox(warm=True, slots=1) as box:
        loader = next(line for line in uids_in_use(box.uids) if " ".join(LOADER.split()[:8]) in line)
        os.kill(int(loader.split()[1]), signal.SIGKILL)
        for _ in range(100):  # its bwrap follows it out
            if not uids_in_use(box.uids):
                break
            await asyncio.sleep(0.02)
        result = await run(box, "after-kill", "print('ran anyway')")
        assert (result.status, result.output) == ("completed", "ran anyway\n")


@pytest.mark.parametrize(
    ("code", "options", "expected"),
    [
        ("print(input())", {"stdin": "from stdin"}, ("completed", "from stdin\n")),
        ("import sys; print(sys.argv[1:])", {"args": ("a", "b")}, ("completed", "['a', 'b']\n")),
        ("x = bytearray(150 * 2**20)", {"limits": {"memory_mb": 64}}, ("memory_limit_exceeded", "")),
        ("print('a' * 100)", {"limits": {"output_bytes": 10}}, ("completed", "a" * 10)),
        ("while True: pass", {"limits": {"timeout": 1.0}}, ("timeout", "")),
    ],
)
async def test_runs_a_warm_sandbox_cannot_stand_for_get_their_own_limits(
    code: str, options: dict[str, object], expected: tuple[str, str]
) -> None:
    async with sandbox(warm=True, slots=1) as box:
        result = await run(box, "own", code, **options)
        assert (result.status, result.output) == expected
        assert box.warm == 1


async def test_shutdown_leaves_no_warm_sandbox_behind() -> None:
    async with sandbox(warm=True, slots=3) as box:
        for _ in range(100):  # bwrap, its init, the loader, for each
            if len(uids_in_use(box.uids)) == 9:
                break
            await asyncio.sleep(0.02)
        assert box.warm == 3 and len(uids_in_use(box.uids)) == 9
    for _ in range(100):  # the sandboxes' inits are reaped by the host's init a moment later
        if not uids_in_use(box.uids):
            break
        await asyncio.sleep(0.02)
    assert uids_in_use(box.uids) == []


@pytest.fixture
def slow_handover(monkeypatch: pytest.MonkeyPatch) -> None:
    """Widen the moment a warm sandbox gets its code, so a kill or a cancel lands inside it."""
    original = warm_pool._write_and_close

    def slow(fd: int, data: bytes) -> None:
        time.sleep(0.5)
        original(fd, data)

    monkeypatch.setattr(warm_pool, "_write_and_close", slow)


@pytest.mark.usefixtures("slow_handover")
async def test_a_kill_during_the_handover_stops_the_run() -> None:
    async with sandbox(warm=True, slots=1) as box:
        python = registry("/usr/bin/python3")["python"]
        code = "import time; time.sleep(3); print('ran to the end')"
        pending = asyncio.create_task(box.run("handover-kill", python, code, box.limits))  # type: ignore[attr-defined]
        await asyncio.sleep(0.1)
        assert box.kill("handover-kill")
        result = await pending
        assert (result.status, result.output) == ("cancelled", "")
        assert result.runtime_ms < 2000


@pytest.mark.usefixtures("slow_handover")
async def test_a_run_cancelled_during_the_handover_leaves_no_sandbox_behind() -> None:
    async with sandbox(warm=True, slots=1) as box:
        python = registry("/usr/bin/python3")["python"]
        code = "import time; time.sleep(30)"
        pending = asyncio.create_task(box.run("handover-cancel", python, code, box.limits))  # type: ignore[attr-defined]
        await asyncio.sleep(0.1)
        pending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pending
        await asyncio.sleep(1)  # the writing thread finishes; the slot's next warm sandbox starts
        interpreters = [line for line in uids_in_use(box.uids) if line.split(None, 2)[2].startswith(PYTHON)]
        assert len(interpreters) == 1  # the slot's new warm sandbox; the cancelled run's is gone
    for _ in range(100):
        if not uids_in_use(box.uids):
            break
        await asyncio.sleep(0.02)
    assert uids_in_use(box.uids) == []
