"""The first hour of a new user: the real `crucible` command against a real `crucible up` in a
folder of its own, given only its ports (tests/up_stack.py).

`crucible keys|submit` must find the stack running from their folder (not a Redis on 6379 or
an API on 8080 that belongs to someone else), `crucible up` must stop at once with one line on a
taken port, point its pieces at each other whatever their ports, and print its banner only
when every piece answers.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bench.stack import ROOT, free_port, stop
from tests.up_stack import CRUCIBLE, PIECES, READY_LINE, UpStack, user_env

README = (ROOT / "README.md").read_text()
#: Starting a whole stack (and the fixture's wait for it) can take a while on a loaded machine.
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UpStack]:
    """One `crucible up`, with /health read the moment its banner appears."""
    up = UpStack(tmp_path_factory.mktemp("first-hour"))
    process = up.start()
    try:
        up.wait_banner()
        up.health_at_banner = httpx.get(f"{up.api_url}/health", timeout=10).json()  # type: ignore[attr-defined]
        yield up
    finally:
        stop(process, signal.SIGINT, timeout=60)


def one_line(done: subprocess.CompletedProcess[str]) -> str:
    """stderr, which must be a single line and no traceback."""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    return lines[0]


def test_the_banner_comes_once_every_piece_answers_wherever_its_ports_are(stack: UpStack) -> None:
    # Only EXECUTOR_PORT moved the executor: the API and the workers found it all the same.
    health = stack.health_at_banner  # type: ignore[attr-defined]
    assert health["workers_online"] >= 1 and health["schedulers_online"] >= 1, health
    assert health["executors_online"] == 1, health
    assert httpx.get(f"http://127.0.0.1:{stack.dashboard_port}/health").status_code == 200
    banner = stack.output()
    assert f"API        {stack.api_url}" in banner
    assert f"executor   http://127.0.0.1:{stack.executor_port}" in banner


def test_up_says_one_line_per_piece_and_keeps_the_pieces_logs_in_files(stack: UpStack) -> None:
    # before the banner: one line per piece as it answers, none of the pieces' own lines
    lines = stack.before_banner()
    named = [m[1] for line in lines if (m := READY_LINE.match(line))]
    assert len(named) == len(lines) and sorted(named) == sorted(PIECES), lines
    assert f"  ✓ executor        http://127.0.0.1:{stack.executor_port}" in lines
    assert f"logs       {stack.logs}/<piece>.log  (CRUCIBLE_UP_LOGS=show" in stack.output()
    # the pieces' logs, in the format asked (LOG_FORMAT=json); up's readiness probes are not in them
    for piece in ("valkey", "executor", "api", "worker", "scheduler", "dashboard", "celery-ingress"):
        assert (stack.logs / f"{piece}.log").is_file(), piece
    api = [json.loads(line) for line in (stack.logs / "api.log").read_text().splitlines()]
    assert any(line["event"] == "Application startup complete." for line in api)
    every = "".join(path.read_text() for path in stack.logs.glob("*.log"))
    assert "probe=1" not in every and "GET /health" not in every


def test_keys_commands_work_on_the_stack_running_from_their_folder(stack: UpStack) -> None:
    created = stack.crucible("keys", "create", "--name", "alice")
    assert created.returncode == 0, created.stderr
    key_id, secret = re.search(r"created key (\w+) ", created.stdout)[1], created.stdout.split()[-1]
    api = httpx.Client(base_url=stack.api_url, headers={"x-api-key": secret}, timeout=30)
    assert api.post("/api/eval", json={"code": "print(1)"}).status_code == 200

    listing = stack.crucible("keys", "list")
    assert listing.returncode == 0, listing.stderr
    rows = [re.split(r"\s{2,}", line.strip()) for line in listing.stdout.splitlines()]
    assert rows[0] == ["id", "tier", "created (UTC)", "revoked (UTC)", "name"]
    alice = next(row for row in rows if row[-1] == "alice")
    assert alice[:2] == [key_id, "standard"] and alice[3] == "-"

    revoked = stack.crucible("keys", "revoke", key_id)
    assert revoked.returncode == 0, revoked.stderr
    assert api.post("/api/eval", json={"code": "print(1)"}).status_code == 401
    again = stack.crucible("keys", "revoke", key_id)
    assert again.returncode == 0 and f"key {key_id} ('alice') was already revoked at " in again.stdout


def test_migration_set_says_what_it_could_not_do(stack: UpStack) -> None:
    nothing = stack.crucible("migration", "set")
    assert nothing.returncode == 2 and "give --share, --force-legacy or --shadow" in one_line(nothing)
    split = stack.crucible("migration", "set", "--share", "1.0")
    assert split.returncode == 0 and json.loads(split.stdout)["split"]["dramatiq_share"] == 1.0
    assert "no legacy Celery deployment is configured" in one_line(split)


def test_submit_finds_the_api_and_admin_key_and_tells_languages_by_extension(stack: UpStack) -> None:
    admin = {"x-api-key": (stack.folder / "data" / "admin.key").read_text().strip()}
    languages = httpx.get(f"{stack.api_url}/api/languages", headers=admin).json()
    offered = {entry["name"] if isinstance(entry, dict) else entry for entry in languages["languages"]}
    programs = {"hello.py": "print('from python')", "hello.sh": "echo from bash"}
    if "javascript" in offered:
        programs["hello.js"] = "console.log('from javascript')"
    if "c" in offered:
        programs["hello.c"] = '#include <stdio.h>\nint main(void) { puts("from c"); return 0; }'
    said = {"py": "python", "sh": "bash", "js": "javascript", "c": "c"}
    for name, code in programs.items():
        (stack.folder / name).write_text(code)
    (stack.folder / "empty.py").write_text("")
    (stack.folder / "fails.py").write_text("print('partial')\n1 / 0")

    done = stack.crucible("submit", *programs, "fails.py", "empty.py")
    assert done.returncode == 1, done.stderr  # one file was refused
    rows = {line.split()[0]: line for line in done.stdout.splitlines()[1:]}
    for name in programs:
        language = said[name.rsplit(".", 1)[1]]
        assert "completed" in rows[name] and rows[name].endswith(f"from {language}"), done.stdout
    # the refusal is told after the progress bar is done, not in the middle of it
    assert "empty.py: refused (422): field 'code' must not be empty" in done.stderr
    assert done.stderr.rindex("100%") < done.stderr.index("empty.py: refused")
    assert "empty.py" not in done.stdout
    # a failure shows its exit code and the last line of its error, which names the exception
    assert re.search(r"fails\.py\s+eval_\w+\s+failed\s+1\s+[\d.]+\s+ZeroDivisionError: division by zero$",
                     rows["fails.py"]), rows["fails.py"]  # fmt: skip


def test_submit_says_in_one_line_what_is_wrong(stack: UpStack) -> None:
    missing = stack.crucible("submit", "nowhere.py")
    assert missing.returncode == 2 and one_line(missing) == "crucible submit: no such file: nowhere.py"
    (stack.folder / "prog.rb").write_text("puts 1")
    unknown = stack.crucible("submit", "prog.rb")
    assert unknown.returncode == 2 and "give --language" in one_line(unknown)
    (stack.folder / "ok.py").write_text("print(1)")
    closed = stack.crucible("submit", "ok.py", "--api", f"http://127.0.0.1:{free_port()}")
    assert closed.returncode == 1 and "cannot reach the API" in one_line(closed)
    bad_key = stack.crucible("submit", "ok.py", "--api-key", "cru_nobody")
    assert bad_key.returncode == 1 and "refused (401)" in one_line(bad_key)
    assert "--api-key" in one_line(bad_key)  # where the key came from
    typo = stack.crucible("submit", "--timout", "1", "ok.py")
    assert typo.returncode == 2 and "usage: crucible submit" in typo.stderr
    assert "unrecognized arguments: --timout (did you mean --timeout?)" in typo.stderr
    helped = stack.crucible("submit", "--help")
    assert "(default: 3600)" in " ".join(helped.stdout.split()) and "data/admin.key" in helped.stdout


def test_admin_commands_without_a_running_stack_say_so(tmp_path: Path) -> None:
    def keys_list(**extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([CRUCIBLE, "keys", "list"], env=user_env(**extra), cwd=tmp_path,
                              capture_output=True, text=True, timeout=60)  # fmt: skip

    none = keys_list()
    assert none.returncode == 2
    assert "no `crucible up` is running from this folder" in one_line(none) and "./dev up" in none.stderr
    # a stack file left by a `crucible up` that is gone (its pid is no crucible up)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "stack.json").write_text(json.dumps({
        "pid": os.getpid(), "redis_url": f"redis://127.0.0.1:{free_port()}/0", "namespace": "crucible",
        "api_url": "", "dashboard_url": "", "executor_url": "",
    }))  # fmt: skip
    stale = keys_list()
    assert stale.returncode == 2 and "is no longer running" in one_line(stale)
    port = free_port()
    unreachable = keys_list(REDIS_URL=f"redis://:hunter2@127.0.0.1:{port}/0")
    assert unreachable.returncode == 1
    line = one_line(unreachable)
    assert f"cannot reach Redis at redis://:***@127.0.0.1:{port}/0" in line and "hunter2" not in line


#: piece -> the UpStack field that holds its port, and the setting that moves it
PORTS = {"API": ("api_port", "CRUCIBLE_API_PORT"), "dashboard": ("dashboard_port", "DASHBOARD_PORT"),
         "executor": ("executor_port", "EXECUTOR_PORT")}  # fmt: skip


@pytest.mark.parametrize("piece", PORTS)
def test_up_stops_at_once_with_one_line_on_a_taken_port(tmp_path: Path, piece: str) -> None:
    up = UpStack(tmp_path)
    field, variable = PORTS[piece]
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        setattr(up, field, taken)
        process = up.start()
        assert process.wait(timeout=30) == 2
    out = up.output().strip()
    assert len(out.splitlines()) == 1, out  # nothing started, nothing else said
    assert out.startswith(f"crucible up: port {taken} ({piece}) is taken by pid {os.getpid()} (")
    assert out.endswith(f"; set {variable} to another port")
    assert not (tmp_path / "data" / "valkey").exists()  # nothing was started


def test_a_port_held_by_another_crucible_stack_is_named_as_such(stack: UpStack, tmp_path: Path) -> None:
    other = UpStack(tmp_path, api_port=stack.api_port)
    assert other.start().wait(timeout=30) == 2
    said = other.output().strip()
    assert f"port {stack.api_port} (API) is taken by pid " in said
    assert "a piece of another Crucible stack: stop that stack, or set CRUCIBLE_API_PORT" in said


def test_a_second_up_in_the_same_folder_is_refused(stack: UpStack) -> None:
    again = subprocess.run([CRUCIBLE, "up"], env=stack.env(), cwd=stack.folder, capture_output=True,
                           text=True, timeout=60)  # fmt: skip
    assert again.returncode == 2
    assert "a stack already runs from this folder" in one_line(again)


def test_the_readme_try_it_section_runs_as_written(stack: UpStack) -> None:
    """README.md's "Try it" commands, run from the stack's folder; only `./dev` (which runs the
    installed `crucible` from the checkout's .venv) and this stack's API port are substituted."""
    section = README.split("## Try it", 1)[1]
    script = section.split("```bash\n", 1)[1].split("```", 1)[0]
    script = script.replace("./dev ", f"{CRUCIBLE} ").replace("localhost:8080", f"localhost:{stack.api_port}")
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], env=user_env(), cwd=stack.folder,
                          capture_output=True, text=True, timeout=180)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"hello\.py\s+eval_\w+\s+completed\s+0\s+[\d.]+\s+hello from the sandbox", done.stdout)
    assert "created key" in done.stdout and "alice" in done.stdout
    events = [json.loads(line[6:]) for line in done.stdout.splitlines() if line.startswith("data: ")]
    assert events[-1]["status"] == "completed"
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["output"] == "42\n" and result["status"] == "completed"


def test_up_says_in_one_line_when_its_redis_does_not_answer(tmp_path: Path) -> None:
    up = UpStack(tmp_path)
    assert up.start(REDIS_URL=f"redis://:hunter2@127.0.0.1:{free_port()}/0").wait(timeout=60) == 1
    said = up.output().strip()
    assert len(said.splitlines()) == 1 and said.startswith("crucible up: cannot reach Redis at redis://:***@")
    assert "hunter2" not in said


def test_a_piece_dying_while_starting_shows_its_last_lines(stack: UpStack, tmp_path: Path) -> None:
    # the running stack's executor holds this sandbox uid range: the new one's executor exits 2
    other = UpStack(tmp_path, uid_base=stack.uid_base)
    assert other.start().wait(timeout=120) == 1
    said = other.output()
    assert "crucible up: the executor exited while starting (code 2); stopping." in said
    assert f"the last lines of {other.logs / 'executor.log'}:" in said
    assert "are in use by another executor on this host" in said  # the executor's own line
    assert "Crucible stopped." in said and "Crucible is up" not in said


def test_ctrl_c_while_starting_stops_everything_and_says_so(tmp_path: Path) -> None:
    up = UpStack(tmp_path)
    process = up.start()
    deadline = time.monotonic() + 60
    while "✓ valkey" not in up.output():
        assert time.monotonic() < deadline and process.poll() is None, up.output()
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=90) == 130
    out = up.output()
    assert "crucible up: stopped while starting." in out and "Crucible is up" not in out
    assert "Crucible stopped." in out and not (tmp_path / "data" / "stack.json").exists()
