"""Init of the QEMU guest `tests/e2e/test_cgroup_v2.py` boots (`tests/vm.py`): a real cgroup v2 kernel.

Run as pid 1 with one argument, a host folder (shared with the guest, writable, at the same
path) to write its results to.
It mounts what a machine has (proc, sys, cgroup2, tmpfs), delegates a group to each of two
executors as systemd's `Delegate=yes` would (one with fork servers, one starting every run
cold), runs the scenarios that matter for cgroups through `POST /execute`, watching the runs'
groups from outside meanwhile, stops the executors, and writes everything it saw to
`results.json`. The host's tests judge it. Standard library only: nothing of the project is
imported here, the executors are the real `crucible executor`.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import traceback
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CGROUP = Path("/sys/fs/cgroup")
OUT = Path("/run/out")
SECRET = "vm-test-secret"
#: name -> (port, uid base, fork servers on)
EXECUTORS = {"forked": (8901, 61000, True), "cold": (8902, 61100, False)}
SLOTS = 2
#: Printed on the console once the guest's own set-up is done: the host then knows the VM runs Python.
STARTED = "CRUCIBLE-GUEST-STARTED"
RB_POWER_OFF = 0x4321FEDC

libc = ctypes.CDLL(None, use_errno=True)

PROGRAMS = {
    # 4 processes of 100 MB each under one 128 MB limit: only a per-run limit stops them
    "memory_across_processes": (
        "import os, time\n"
        "kids = []\n"
        "for _ in range(4):\n"
        "    pid = os.fork()\n"
        "    if pid == 0:\n"
        "        block = bytearray(100 * 1024 * 1024)\n"
        "        for i in range(0, len(block), 4096): block[i] = 1\n"
        "        time.sleep(1)\n"
        "        os._exit(0)\n"
        "    kids.append(pid)\n"
        "ok = sum(os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) == 0 for p in kids)\n"
        "print('children that finished:', ok)\n"
    ),
    # 3 processes of 50 MB each, held together: the run's peak is their sum
    "peak_memory": (
        "import os, time\n"
        "kids = []\n"
        "for _ in range(3):\n"
        "    pid = os.fork()\n"
        "    if pid == 0:\n"
        "        block = bytearray(50 * 1024 * 1024)\n"
        "        for i in range(0, len(block), 4096): block[i] = 1\n"
        "        time.sleep(1.5)\n"
        "        os._exit(0)\n"
        "    kids.append(pid)\n"
        "for p in kids: os.waitpid(p, 0)\n"
        "print('done')\n"
    ),
    "fork_bomb": (
        "import os, time\n"
        "n = 0\n"
        "try:\n"
        "    while n < 1000:\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(2)\n"
        "            os._exit(0)\n"
        "        n += 1\n"
        "except OSError as exc:\n"
        "    print('forks refused after', n, exc.errno)\n"
        "else:\n"
        "    print('all 1000 forks made')\n"
    ),
    # 4 processes spinning on one CPU: each alone would take 4 s to use its own 1 s
    "cpu_time_over_processes": (
        "import os\nfor _ in range(3):\n    if os.fork() == 0:\n        break\nwhile True:\n    pass\n"
    ),
    "wall_limit": "import time\ntime.sleep(60)\n",
    "kill": (
        "import os, time\n"
        "for _ in range(3):\n"
        "    if os.fork() == 0:\n"
        "        os.setsid()\n"
        "        time.sleep(60)\n"
        "        os._exit(0)\n"
        "print('started', flush=True)\n"
        "time.sleep(60)\n"
    ),
    "hello": "print('hello')\n",
}
#: scenario -> request fields beside the code
FIELDS: dict[str, dict[str, Any]] = {
    "memory_across_processes": {"memory_mb": 128, "timeout": 10},
    "peak_memory": {"memory_mb": 256, "timeout": 10},
    "fork_bomb": {"memory_mb": 256, "timeout": 10},
    "cpu_time_over_processes": {"timeout": 1},
    # CPU time to spare: a cold start alone takes ~1 s of it in an emulated CPU
    "wall_limit": {"timeout": 5, "wall_timeout": 1.5},
    "kill": {"timeout": 10},
    "hello": {},
}


def main() -> int:
    """pid 1: set the machine up, run the manager, reap every orphan, power off."""
    out_dir = sys.argv[1]
    try:
        set_up_machine(out_dir)
        print(STARTED, flush=True)
    except BaseException:
        traceback.print_exc()
        power_off()
    manager = os.fork()
    if manager == 0:
        code = 1
        try:
            code = manage()
        except BaseException:
            traceback.print_exc()
            with open(OUT / "guest-error.txt", "w") as f:
                traceback.print_exc(file=f)
        finally:
            os._exit(code)
    while True:  # as any init: reap orphans until the manager is done
        pid, _ = os.wait()
        if pid == manager:
            break
    os.sync()
    power_off()
    return 0


def set_up_machine(out_dir: str) -> None:
    run = [("proc", "/proc", "proc"), ("sysfs", "/sys", "sysfs"), ("cgroup2", str(CGROUP), "cgroup2"),
           ("tmpfs", "/run", "tmpfs")]  # fmt: skip
    for source, target, kind in run:
        mount(source, target, kind)
    OUT.mkdir()
    mount(out_dir, str(OUT), None, flags=4096)  # MS_BIND: the results folder, before /tmp is hidden
    # a checkout under /tmp (a CI clone) stays where it is: held aside, then put back over the tmpfs
    held = Path("/run/checkout")
    under_tmp = REPO.is_relative_to("/tmp")
    if under_tmp:
        held.mkdir()
        mount(str(REPO), str(held), None, flags=4096)
    mount("tmpfs", "/tmp", "tmpfs")
    if under_tmp:
        REPO.mkdir(parents=True)
        mount(str(held), str(REPO), None, flags=4096)
    if not Path("/dev/null").exists():
        mount("devtmpfs", "/dev", "devtmpfs")
    Path("/dev/shm").mkdir(exist_ok=True)
    mount("tmpfs", "/dev/shm", "tmpfs")
    Path("/run/lock").mkdir()
    loopback_up()


def mount(source: str, target: str, kind: str | None, flags: int = 0) -> None:
    if libc.mount(source.encode(), target.encode(), kind and kind.encode(), flags, None) != 0:
        raise OSError(ctypes.get_errno(), f"mount {target}")


def loopback_up() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        request = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(s.fileno(), 0x8913, request))[1]
        fcntl.ioctl(s.fileno(), 0x8914, struct.pack("16sH14x", b"lo", flags | 1))


def power_off() -> None:
    libc.reboot(RB_POWER_OFF)
    os._exit(1)


def manage() -> int:
    results: dict[str, Any] = {"machine": machine()}
    started = time.monotonic()
    # the host's delegation, as systemd gives a unit with Delegate=yes: controllers enabled
    # for the root's children, one group per executor that the executor then owns
    for controller in ("cpu", "io", "memory", "pids"):
        (CGROUP / "cgroup.subtree_control").write_text(f"+{controller}")
    processes = {name: start_executor(name, *spec) for name, spec in EXECUTORS.items()}
    try:
        for name, (port, _, forked) in EXECUTORS.items():
            health = wait_ready(port, SLOTS if forked else 0)
            results[name] = {"health": health, "ready_after_s": round(time.monotonic() - started, 1)}
        for name, (port, uid_base, _) in EXECUTORS.items():
            results[name]["runs"] = run_scenarios(name, port, uid_base)
            results[name]["health_after"] = get(port, "/health")
            results[name]["tree_idle"] = tree(CGROUP / f"crucible-{name}.service")
    finally:
        for process in processes.values():
            process.send_signal(signal.SIGTERM)
        for name, process in processes.items():
            try:
                results.setdefault(name, {})["exit_code"] = process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                results[name]["exit_code"] = "did not stop"
            log = (OUT / f"executor-{name}.log").read_text(errors="replace")
            results[name]["shutdown_complete"] = "Application shutdown complete" in log
            results[name]["tree_after_stop"] = tree(CGROUP / f"crucible-{name}.service")
            results[name]["uid_processes_after_stop"] = processes_of(EXECUTORS[name][1])
        results["took_s"] = round(time.monotonic() - started, 1)
        (OUT / "results.json").write_text(json.dumps(results, indent=1))
    return 0


def machine() -> dict[str, Any]:
    return {
        "kernel": os.uname().release,
        "controllers": (CGROUP / "cgroup.controllers").read_text().split(),
        "swap": Path("/proc/swaps").read_text().count("\n") > 1,
    }


def start_executor(name: str, port: int, uid_base: int, forked: bool) -> subprocess.Popen[bytes]:
    """`crucible executor` in a group of its own (made and entered before it starts, as a
    service manager does), with cgroups on `auto`: without the v2 backend it runs on rlimits."""
    group = CGROUP / f"crucible-{name}.service"
    group.mkdir()
    if forked:  # as systemd 251+ marks a unit with Delegate=yes; the cold one's is unmarked, as
        os.setxattr(group, "trusted.delegate", b"1")  # older systemd leaves it: a service's own
    env = {
        "PATH": "/usr/bin:/bin:/usr/sbin:/sbin",
        "HOME": "/tmp",
        "LANG": "C.UTF-8",
        "EXECUTOR_SECRET": SECRET,
        "EXECUTOR_HOST": "127.0.0.1",
        "EXECUTOR_PORT": str(port),
        "EXECUTOR_CONCURRENCY": str(SLOTS),
        "SANDBOX_UID_BASE": str(uid_base),
        "SANDBOX_CGROUPS": "auto",
        "SANDBOX_FORK_SERVER": "true" if forked else "false",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    log = open(OUT / f"executor-{name}.log", "wb")
    enter = f'echo $$ > {group}/cgroup.procs && exec "$@"'
    command = ["/bin/sh", "-c", enter, "enter", str(REPO / ".venv/bin/crucible"), "executor"]
    return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd="/tmp")


def get(port: int, path: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=60) as answer:
        return json.loads(answer.read())


def post(port: int, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=json.dumps(body or {}).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {SECRET}"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as answer:
            return json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return {"http_error": exc.code, "body": exc.read().decode(errors="replace")}


def wait_ready(port: int, fork_servers: int) -> dict[str, Any]:
    """/health once it answers and the executor has its fork servers (slow to import in an emulated CPU)."""
    deadline = time.monotonic() + 120
    health: dict[str, Any] = {}
    while time.monotonic() < deadline:
        try:
            health = get(port, "/health")
        except OSError:
            time.sleep(0.5)
            continue
        if health.get("fork_servers", 0) >= fork_servers:
            return health
        time.sleep(0.5)
    return health


def run_scenarios(name: str, port: int, uid_base: int) -> dict[str, Any]:
    runs: dict[str, Any] = {}
    # the executor's own folder of run groups (one executor in this group: one such folder)
    runs_dir = next((CGROUP / f"crucible-{name}.service" / "runs").glob("crucible-*"))
    for scenario, code in PROGRAMS.items():
        eval_id = f"{name}-{scenario}"
        body = {"eval_id": eval_id, "code": code, "language": "python", **FIELDS[scenario]}
        watcher = GroupWatcher(runs_dir)
        killer = None
        if scenario == "kill":
            killer = threading.Thread(target=kill_once_started, args=(port, eval_id, watcher))
            killer.start()
        watcher.start()
        began = time.monotonic()
        result = post(port, "/execute", body)
        answered_s = time.monotonic() - began
        watcher.stop()
        if killer:
            killer.join()
        time.sleep(0.5)  # a killed run's groups go from the executor's loop a moment later
        runs[scenario] = {
            "result": result,
            "answered_s": round(answered_s, 2),
            "groups": watcher.seen,
            "uid_processes_after": processes_of(uid_base),
            "run_groups_after": sorted(p.name for p in runs_dir.iterdir() if p.is_dir())
            if runs_dir.exists()
            else [],
        }
        if killer:
            runs[scenario]["kill_answer"] = watcher.kill_answer
    return runs


def kill_once_started(port: int, eval_id: str, watcher: GroupWatcher) -> None:
    """Kill the run once its group holds its program and the program's 3 children."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and max((g["pids_peak"] for g in watcher.seen.values()), default=0) < 5:
        time.sleep(0.1)
    time.sleep(0.3)
    watcher.kill_answer = post(port, f"/kill/{eval_id}")


class GroupWatcher:
    """Polls the runs' groups from outside while a run goes: their limits as the kernel holds
    them and the most each held (what the run itself cannot see or fake)."""

    def __init__(self, runs_dir: Path) -> None:
        self.runs_dir = runs_dir
        self.seen: dict[str, dict[str, Any]] = {}
        self.kill_answer: dict[str, Any] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _poll(self) -> None:
        while not self._stop.is_set():
            if self.runs_dir.exists():
                for group in self.runs_dir.iterdir():
                    if group.is_dir():
                        self._sample(group)
            self._stop.wait(0.05)

    def _sample(self, group: Path) -> None:
        try:
            pids = int((group / "pids.current").read_text())
            entry = self.seen.setdefault(group.name, {
                "memory.max": (group / "memory.max").read_text().strip(),
                "pids.max": (group / "pids.max").read_text().strip(),
                "cpu.max": read_or_none(group / "cpu.max"),
                "pids_peak": 0, "memory_peak": 0,
            })  # fmt: skip
            entry["memory.max"] = (group / "memory.max").read_text().strip()  # set when the run came
            entry["pids.max"] = (group / "pids.max").read_text().strip()
            entry["pids_peak"] = max(entry["pids_peak"], pids)
            entry["memory_peak"] = max(entry["memory_peak"], int((group / "memory.current").read_text()))
            events = dict(line.split() for line in (group / "pids.events").read_text().splitlines())
            entry["pids_refused"] = int(events.get("max", 0))
        except (OSError, ValueError):
            pass  # the group went meanwhile


def read_or_none(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def processes_of(uid_base: int) -> list[dict[str, str]]:
    """Processes running as the executor's slot uids, with their groups (its fork servers,
    in its own group, and the inits they prepare for the next runs are expected)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            group = (entry / "cgroup").read_text().strip().removeprefix("0::")
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        uid = int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1])
        if uid_base <= uid < uid_base + SLOTS:
            found.append({"pid": entry.name, "group": group, "cmdline": cmdline[:100]})
    return found


def tree(group: Path) -> list[str]:
    """Every group under `group`, with how many processes each holds."""
    if not group.exists():
        return []
    return [f"{path.relative_to(group)} {len((path / 'cgroup.procs').read_text().split())}"
            for path in sorted(p for p in group.rglob("*") if p.is_dir())]  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
