"""`crucible up`: the whole stack on an embedded Valkey, stopped with Ctrl-C, restarted; a piece
that dies is started again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from bench.stack import LOG_DIR, ROOT, free_port, stop, wait_http


def start_up(data_dir: Path, api_port: int, executor_port: int, **extra: str) -> subprocess.Popen[bytes]:
    # No REDIS_URL (embedded Valkey), no fixed admin key or secret: `up` makes its own.
    dropped = ("REDIS_URL", "CELERY_BROKER_URL", "CRUCIBLE_ADMIN_KEY", "EXECUTOR_SECRET")
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    env.update(
        CRUCIBLE_DATA_DIR=str(data_dir),
        CRUCIBLE_API_PORT=str(api_port),
        EXECUTOR_PORT=str(executor_port),
        EXECUTOR_SERVICE_URL=f"http://127.0.0.1:{executor_port}",
        CELERY_CONCURRENCY="1",
        CRUCIBLE_WORKER_THREADS="2",
        LOG_FORMAT="json",
        **extra,
    )
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    log = open(LOG_DIR / "up.log", "ab")
    return subprocess.Popen(
        [sys.executable, "-m", "app.cli", "up"], env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
    )


def wait_status(api: httpx.Client, eval_id: str, wanted: str, seconds: float = 30) -> dict:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        body = api.get(f"/api/eval/{eval_id}").json()
        if body["status"] == wanted:
            return body
        time.sleep(0.1)
    raise AssertionError(f"{eval_id} is {body['status']}, not {wanted}")


def port_closed(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def test_up_runs_everything_and_a_restart_finds_queued_work(tmp_path: Path) -> None:
    api_port, executor_port = free_port(), free_port()
    url = f"http://127.0.0.1:{api_port}"

    # First start: workers take only the high queue, so a default submission stays queued.
    first = start_up(tmp_path, api_port, executor_port, CELERY_QUEUES="high_priority")
    try:
        wait_http(f"{url}/health", 60)
        # The first start made an admin key, printed it and kept it in the data folder.
        key = (tmp_path / "admin.key").read_text().strip()
        deadline = time.monotonic() + 20
        while f"admin key  {key}" not in (LOG_DIR / "up.log").read_text():
            assert time.monotonic() < deadline, "crucible up did not print the admin key"
            time.sleep(0.1)
        assert oct((tmp_path / "admin.key").stat().st_mode & 0o777) == "0o600"
        assert httpx.get(f"{url}/api/evaluations").status_code == 401
        api = httpx.Client(base_url=url, headers={"x-api-key": key}, timeout=30)
        done = api.post("/api/eval", json={"code": "print('fast')", "priority": True}).json()
        assert wait_status(api, done["eval_id"], "completed")["output"] == "fast\n"
        waiting = api.post("/api/eval", json={"code": "print('survived a restart')"}).json()
        time.sleep(1)
        assert api.get(f"/api/eval/{waiting['eval_id']}").json()["status"] == "queued"
    finally:
        first.send_signal(signal.SIGINT)  # what Ctrl-C sends
        assert first.wait(timeout=60) == 0
    assert port_closed(api_port) and port_closed(executor_port)
    assert (tmp_path / "valkey" / "appendonlydir").is_dir()

    # Second start on the same data folder, consuming every level: the queued work runs.
    second = start_up(tmp_path, api_port, executor_port)
    try:
        wait_http(f"{url}/health", 60)
        assert (tmp_path / "admin.key").read_text().strip() == key  # the same key, still valid
        result = wait_status(api, waiting["eval_id"], "completed")
        assert result["output"] == "survived a restart\n"
        assert api.get(f"/api/eval/{done['eval_id']}").json()["status"] == "completed"

        # A worker process killed mid-run (as the OOM killer would) takes its `crucible worker`
        # down with it; `up` starts the worker again and the run comes back and finishes.
        slow = api.post("/api/eval", json={"code": "import time; time.sleep(2); print('after kill')"}).json()
        worker = wait_status(api, slow["eval_id"], "running")["worker"]
        os.kill(int(worker.rsplit(":", 1)[1]), signal.SIGKILL)
        assert wait_status(api, slow["eval_id"], "completed", seconds=60)["output"] == "after kill\n"
        assert "worker exited" in (LOG_DIR / "up.log").read_text()
    finally:
        stop(second, signal.SIGINT, timeout=60)
    assert second.returncode == 0
