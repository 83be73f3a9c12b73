"""The sandbox, exercised through the real executor service: what hostile code cannot do."""

from __future__ import annotations

import ast
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any

import httpx

from evaluations.languages import registry
from executor.app import open_cgroups, stage_bwrap
from executor.errors import SandboxError
from executor.limits import Limits
from executor.sandbox import Sandbox
from executor.seccomp import build_filter
from executor.verdict import RunResult
from infra.settings import Settings
from tests.helpers import execute as run
from tests.helpers import executor_client


async def test_no_network_at_all(executor: httpx.AsyncClient, redis_url: str) -> None:
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    code = f"""
import socket
results = []
try:
    socket.create_connection(("127.0.0.1", {port}), timeout=2)
    results.append("tcp-open")
except OSError as e:
    results.append("tcp-refused")
try:
    socket.getaddrinfo("example.com", 80)
    results.append("dns-resolved")
except OSError:
    results.append("dns-failed")
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
try:
    s.sendto(b"x", ("8.8.8.8", 53))
    results.append("udp-sent")
except OSError:
    results.append("udp-unreachable")
print(" ".join(results))
print(sorted(n for _, n in socket.if_nameindex()))
"""
    result = await run(executor, code)
    assert result["status"] == "completed", result
    assert result["output"].splitlines() == ["tcp-refused dns-failed udp-unreachable", "['lo']"]


async def test_cannot_write_outside_its_tmpfs(executor: httpx.AsyncClient) -> None:
    code = """
import os
for path in ["/escape", "/usr/escape", "/usr/local/escape", "/sandbox/escape", "/proc/escape", "/bin/escape",
             "/dev/escape"]:
    try:
        open(path, "w").write("x")
        print("WROTE", path)
    except OSError as e:
        print("denied", path)
open("/tmp/ok", "w").write("fine")
print("tmp", open("/tmp/ok").read(), os.getcwd())
"""
    result = await run(executor, code)
    assert result["status"] == "completed", result
    assert "WROTE" not in result["output"]
    assert "tmp fine /tmp" in result["output"]
    assert not os.path.exists("/escape") and not os.path.exists("/usr/escape")


async def test_host_files_and_environment_are_invisible(executor: httpx.AsyncClient) -> None:
    code = """
import os
print(sorted(os.listdir("/")))
for path in ["/etc/shadow", "/etc/passwd", "/root", "/home", "/proc/1/environ"]:
    print(path, os.path.exists(path))
print("usr/local", os.listdir("/usr/local"))
print(sorted(os.environ))
print(os.getuid() != 0)
"""
    result = await run(executor, code)
    assert result["status"] == "completed", result
    lines = result["output"].splitlines()
    assert lines[0] == "['bin', 'dev', 'lib', 'lib64', 'proc', 'sandbox', 'tmp', 'usr']"
    assert "/etc/shadow False" in lines and "/root False" in lines
    assert "usr/local []" in lines
    assert lines[-2] == "['HOME', 'LANG', 'PATH', 'PWD', 'TMPDIR']"
    assert lines[-1] == "True"


async def test_the_sandbox_init_carries_nothing_of_the_host_environment(executor: httpx.AsyncClient) -> None:
    # a forked run's init (executor/fork_server_program.py) is not dumpable: nothing to read
    code = (
        "import os\nfor pid in ('1', '2'):\n    try:\n"
        "        print(open(f'/proc/{pid}/environ').read().split('\\0'))\n"
        "    except PermissionError:\n        print([] if pid == '1' else 'unreadable')"
    )
    result = await run(executor, code)
    assert result["status"] == "completed", result
    for line in result["output"].splitlines():
        allowed = {"", "PATH=/usr/bin:/bin", "LANG=C.UTF-8", "PWD=/", "PWD=/tmp", "HOME=/tmp", "TMPDIR=/tmp"}
        assert not set(ast.literal_eval(line)) - allowed, line


async def test_kill_stops_a_run_and_reports_cancelled(executor: httpx.AsyncClient) -> None:
    import asyncio

    eval_id = f"kill-{uuid.uuid4().hex[:8]}"
    body = {"eval_id": eval_id, "code": "import time; time.sleep(30)", "timeout": 30}
    pending = asyncio.create_task(executor.post("/execute", json=body))
    for _ in range(100):
        running = (await executor.get("/running")).json()
        if eval_id in [r["eval_id"] for r in running["running"]]:
            break
        await asyncio.sleep(0.05)
    killed = await executor.post(f"/kill/{eval_id}")
    assert killed.status_code == 200
    result = (await pending).json()
    assert result["status"] == "cancelled"
    assert result["runtime_ms"] < 5000
    assert (await executor.post(f"/kill/{eval_id}")).status_code == 404


async def test_health_names_the_sandbox_and_what_enforces_limits(executor: httpx.AsyncClient) -> None:
    body = (await executor.get("/health")).json()
    assert body["status"] == "healthy"
    assert body["sandbox"].startswith("bubblewrap")
    assert body["limits_enforced_by"] in ("cgroup-v1", "rlimit")
    assert body["seccomp"] is True
    assert "python" in body["languages"]
    assert 0 < body["fork_servers"] <= body["capacity"]  # Python fork servers (SANDBOX_FORK_SERVER)


async def test_a_cancel_before_the_run_arrives_wins_but_an_abandoned_attempt_does_not(
    executor: httpx.AsyncClient,
) -> None:
    cancelled, abandoned = f"c-{uuid.uuid4().hex[:8]}", f"a-{uuid.uuid4().hex[:8]}"
    assert (await executor.post(f"/kill/{cancelled}")).status_code == 404
    result = await run(executor, "print('should not run')", eval_id=cancelled)
    assert result["status"] == "cancelled" and result["output"] == ""
    assert (await executor.post(f"/kill/{abandoned}", params={"attempt_only": "true"})).status_code == 404
    assert (await run(executor, "print('runs')", eval_id=abandoned))["output"] == "runs\n"


async def test_a_full_executor_says_busy_at_once() -> None:
    import asyncio

    from bench.stack import free_port, process, wait_http

    port = free_port()
    env = {"EXECUTOR_PORT": str(port), "EXECUTOR_CONCURRENCY": "1", "LOG_FORMAT": "json"}
    with process("executor-one-slot", "executor", env):
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/health")
        async with executor_client(url) as client:
            long = asyncio.create_task(run(client, "import time; time.sleep(1.5)"))
            await asyncio.sleep(0.5)
            busy = await client.post("/execute", json={"eval_id": "second", "code": "print(1)"})
            assert busy.status_code == 503 and busy.json()["details"]["busy"] is True
            assert (await long)["status"] == "completed"
            assert (await run(client, "print('free again')"))["output"] == "free again\n"


async def test_a_sandbox_that_cannot_start_is_an_internal_error_not_the_submissions() -> None:
    from bench.stack import free_port, process, wait_http

    port = free_port()
    env = {"EXECUTOR_PORT": str(port), "SANDBOX_TMPFS_MB": "-1"}  # bwrap refuses this size
    with process("executor-broken", "executor", env):
        wait_http(f"http://127.0.0.1:{port}/health")
        async with executor_client(f"http://127.0.0.1:{port}") as client:
            response = await client.post("/execute", json={"eval_id": "x", "code": "print(1)"})
    assert response.status_code == 500
    assert response.json()["error"] == "the sandbox failed to start; the submission was not run"


class _BrokenMounts(Sandbox):
    """Set-up that fails after bwrap's clone (a bind of a missing path), as a host fault would."""

    def command(self, argv: tuple[str, ...], *rest: Any, **options: Any) -> list[str]:
        line = super().command(argv, *rest, **options)
        return [line[0], "--ro-bind", "/nonexistent-crucible-test", "/x", *line[1:]]


async def test_a_set_up_failure_after_the_clone_is_an_internal_error_not_the_submissions() -> None:
    settings = Settings.from_env()
    python = registry(settings.python_path)["python"]
    limits = Limits(timeout=5, memory_mb=256, output_bytes=65536, processes=64, open_files=64,
                    file_size_mb=16, tmpfs_mb=100)  # fmt: skip
    results = {}
    for kind in (Sandbox, _BrokenMounts):
        with tempfile.TemporaryDirectory(prefix="crucible-test-bwrap-") as runtime:
            cgroups = open_cgroups(settings)
            sandbox = kind(stage_bwrap(Path(runtime)), uid_base=settings.sandbox_uid_base, slots=1,
                           cgroups=cgroups, seccomp=build_filter())  # fmt: skip
            try:
                results[kind] = await sandbox.run("setup", python, "import sys; sys.exit(1)", limits)
            except SandboxError as exc:
                results[kind] = exc
            finally:
                if cgroups:
                    cgroups.close()
    assert isinstance(results[Sandbox], RunResult) and results[Sandbox].status == "failed"
    assert isinstance(results[_BrokenMounts], SandboxError)
    assert "/nonexistent-crucible-test" in str(results[_BrokenMounts])
