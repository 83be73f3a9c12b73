"""Each executor on a host runs its slots as sandbox uids no other live executor holds, and
kills what an executor of its range that died left running under them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx

from bench.stack import ROOT, free_port, free_uid_base, process, wait_http
from tests.conftest import ExecutorService


def test_a_second_executor_on_a_held_range_refuses_to_start_and_says_why(
    executor_service: ExecutorService,
) -> None:
    env = {**os.environ, "SANDBOX_UID_BASE": str(executor_service.uids[0]), "EXECUTOR_PORT": str(free_port())}
    done = subprocess.run(
        [sys.executable, "-m", "app.cli", "executor"], env=env, cwd=ROOT, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    said = done.stderr.strip().splitlines()
    assert len(said) == 1, done.stderr  # one line, no traceback
    assert f"pid {executor_service.pid}" in said[0] and "SANDBOX_UID_BASE" in said[0]


def test_an_executor_kills_what_a_dead_one_of_its_range_left_running() -> None:
    """A sandbox that outlived its executor (found by a review after a SIGKILL) stands in
    here as a process running as one of the range's uids."""
    base = free_uid_base()
    leftover = subprocess.Popen(
        ["setpriv", f"--reuid={base + 3}", f"--regid={base + 3}", "--clear-groups", "sleep", "120"]
    )
    try:
        port = free_port()
        env = {"SANDBOX_UID_BASE": str(base), "EXECUTOR_PORT": str(port), "LOG_FORMAT": "json"}
        with process("executor-sweeps", "executor", env):
            wait_http(f"http://127.0.0.1:{port}/health")
            for _ in range(50):
                if leftover.poll() is not None:
                    break
                time.sleep(0.1)
            assert leftover.poll() is not None, "the leftover of the range still runs"
    finally:
        leftover.kill()
        leftover.wait()


def test_a_killed_executor_leaves_no_sandbox_behind() -> None:
    """A review found a pre-started sandbox of an executor killed with SIGKILL still alive minutes
    later. bwrap's --die-with-parent takes each sandbox down with its executor."""
    base, port = free_uid_base(), free_port()
    env = {"SANDBOX_UID_BASE": str(base), "EXECUTOR_PORT": str(port), "LOG_FORMAT": "json"}
    with process("executor-killed", "executor", env) as executor:
        wait_http(f"http://127.0.0.1:{port}/health")
        for _ in range(100):  # every slot's fork server started
            if httpx.get(f"http://127.0.0.1:{port}/health").json()["fork_servers"] == 8:
                break
            time.sleep(0.1)
        assert running_as(range(base, base + 8))
        os.killpg(executor.pid, signal.SIGKILL)
        executor.wait()
    for _ in range(50):
        if not running_as(range(base, base + 8)):
            break
        time.sleep(0.1)
    assert running_as(range(base, base + 8)) == []


def running_as(uids: range) -> list[str]:
    ps = subprocess.run(["ps", "-eo", "uid=,pid=,stat=,args="], capture_output=True, text=True).stdout
    return [line for line in ps.splitlines() if int(line.split()[0]) in uids and "Z" not in line.split()[2]]
