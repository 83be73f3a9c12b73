"""`crucible up`: the whole stack on an embedded Valkey, stopped with Ctrl-C, restarted; a piece
that dies is started again; its pieces' logs on its output when asked, else in files."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import httpx
import pytest
import redis

from bench.stack import stop
from evaluations.redis_keys import RedisKeys
from tests.up_stack import READY_LINE, UpStack


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


@pytest.mark.timeout(600)  # two whole starts and stops
def test_up_runs_everything_and_a_restart_finds_queued_work(tmp_path: Path) -> None:
    up = UpStack(tmp_path)
    url = up.api_url
    data = tmp_path / "data"

    # First start: workers take only the high queue, so a default submission stays queued. The
    # pieces' logs are asked for on up's output: there, between the pieces' ready lines, but
    # not the access lines of up's own readiness probes.
    first = up.start(CELERY_QUEUES="high_priority", CRUCIBLE_UP_LOGS="show")
    try:
        up.wait_banner()
        shown = [json.loads(line) for line in up.before_banner() if line.startswith("{")]
        assert {"Application startup complete.", "Worker process is ready for action."} <= {
            line["event"] for line in shown
        }, shown
        assert sum(bool(READY_LINE.match(line)) for line in up.before_banner()) == 7
        assert "probe=1" not in up.output() and "celery-status" not in up.output()
        assert not up.logs.exists()
        # The first start made an admin key, printed it and kept it in the data folder.
        key = (data / "admin.key").read_text().strip()
        assert f"admin key  {key}" in up.log.read_text()
        assert oct((data / "admin.key").stat().st_mode & 0o777) == "0o600"
        # where each piece answers, for the commands run from this folder
        stack = json.loads((data / "stack.json").read_text())
        assert stack["api_url"] == url and stack["pid"] == first.pid
        valkey_port = stack["redis_url"].rsplit(":", 1)[1].split("/")[0]
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
    assert port_closed(up.api_port) and port_closed(up.executor_port)
    assert (data / "valkey" / "appendonlydir").is_dir()
    assert not (data / "stack.json").exists()  # no stack runs from this folder any more

    # Second start on the same data folder, consuming every level: the queued work runs, and
    # the embedded Valkey is on the same port as before (it was free).
    second = up.start()
    try:
        up.wait_banner()
        again = json.loads((data / "stack.json").read_text())
        assert again["redis_url"] == f"redis://127.0.0.1:{valkey_port}/0"
        assert (data / "admin.key").read_text().strip() == key  # the same key, still valid
        result = wait_status(api, waiting["eval_id"], "completed")
        assert result["output"] == "survived a restart\n"
        assert api.get(f"/api/eval/{done['eval_id']}").json()["status"] == "completed"

        # A worker process killed mid-run (as the OOM killer would) takes its `crucible worker`
        # down with it; `up` starts the worker again and the run comes back and finishes.
        slow = api.post("/api/eval", json={"code": "import time; time.sleep(2); print('after kill')"}).json()
        worker = wait_status(api, slow["eval_id"], "running")["worker"]
        os.kill(int(worker.rsplit(":", 1)[1]), signal.SIGKILL)
        assert wait_status(api, slow["eval_id"], "completed", seconds=60)["output"] == "after kill\n"
        # the pieces' logs were in files this time, so `up` shows what the worker said last
        said = up.output()
        assert "worker exited" in said and f"the last lines of {up.logs / 'worker.log'}:" in said
        assert not any(line.startswith("{") for line in up.before_banner())
    finally:
        stop(second, signal.SIGINT, timeout=60)
    assert second.returncode == 0


def test_up_ha_runs_a_replica_and_sentinels_and_answers_once_a_replica_has_it(tmp_path: Path) -> None:
    """`crucible up --ha`: a primary, a replica and three Sentinels as pieces of the stack, every
    piece following the Sentinels; a submission is answered once the replica has it. (A fail-over
    under load: tests/e2e/test_failover.py.)"""
    up = UpStack(tmp_path)
    up.start("--ha")
    try:
        banner = up.wait_banner()
        replica = int(re.search(r"replica :(\d+)", banner).group(1))  # type: ignore[union-attr]
        assert "Sentinels 127.0.0.1:" in banner and "embedded" not in banner
        key = (tmp_path / "data" / "admin.key").read_text().strip()
        with httpx.Client(base_url=up.api_url, headers={"X-API-Key": key}, timeout=30) as api:
            answer = api.post("/api/eval?wait=true", json={"code": "print(1)"})
            assert answer.status_code == 200 and answer.json()["status"] == "completed", answer.text
            eval_id = answer.json()["eval_id"]
        copy = redis.Redis(port=replica, decode_responses=True)
        assert copy.role()[0] == "slave"
        assert copy.hget(RedisKeys("crucible").record(eval_id), "status") == "completed"
        copy.close()
    finally:
        stop(up.process)
