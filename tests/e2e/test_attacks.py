"""The attack suite: hostile programs through the real executor; each asserts the verdict and
that the host is unharmed afterwards (next run works, no leftover processes or files, the
executor's memory steady)."""

from __future__ import annotations

import ast
import asyncio
import subprocess
import uuid
from pathlib import Path

import httpx
import pytest

from tests.conftest import EXECUTOR_SECRET, ExecutorService
from tests.helpers import execute as run

#: How a fork server's sandbox shows in `ps` (a cold run's has `--cap-drop ALL`), and where an
#: idle server waits: for the executor's next request, on its socket.
FORK_SERVER_MARK = "--cap-add ALL"
IDLE_SERVER_WAIT = "skb_wait_for_more_packets"


#: The sandbox uids of the executor under test (its own on this host: see executor/uid_range.py).
SANDBOX_UIDS: range = range(0)


@pytest.fixture(autouse=True)
def _sandbox_uids(executor_service: ExecutorService) -> None:
    global SANDBOX_UIDS
    SANDBOX_UIDS = executor_service.uids


def sandbox_processes() -> str:
    """Processes on the host owned by the executor's sandbox uids, except its idle fork
    servers: each exactly bwrap, its init, the server waiting for a request and the next
    run's init waiting for its run."""
    assert SANDBOX_UIDS, "the executor under test runs its slots as no uid of their own"
    ps = subprocess.run(
        ["ps", "-ww", "-eo", "uid=,pid=,ppid=,wchan:32=,args="], capture_output=True, text=True
    )
    rows = [line.split(None, 4) for line in ps.stdout.splitlines() if int(line.split()[0]) in SANDBOX_UIDS]
    parent = {row[1]: row[2] for row in rows}
    trees: dict[str, list[list[str]]] = {}
    for row in rows:
        top = row[1]
        while parent.get(top) in parent:
            top = parent[top]
        trees.setdefault(top, []).append(row)
    active = []
    for tree in trees.values():
        server = [r for r in tree if FORK_SERVER_MARK in r[4]]
        waiting = [r for r in tree if r[3] == IDLE_SERVER_WAIT]
        if not (len(tree) == 4 and server and len(waiting) == 2):
            active += [" ".join(r) for r in tree]
    return "\n".join(active)


def rss_kb(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS")).split()[1])


async def assert_host_unharmed(executor: httpx.AsyncClient) -> None:
    for _ in range(40):  # the pid namespace is torn down asynchronously after the answer
        if not sandbox_processes():
            break
        await asyncio.sleep(0.05)
    assert sandbox_processes() == ""
    after = await run(executor, "print('next run works')")
    assert after["status"] == "completed" and after["output"] == "next run works\n"
    assert (await executor.get("/running")).json()["running"] == []


async def test_fork_bomb(executor: httpx.AsyncClient) -> None:
    result = await run(executor, "import os\nwhile True:\n    os.fork()", timeout=5)
    assert result["status"] in ("failed", "timeout"), result
    await assert_host_unharmed(executor)


async def test_memory_bomb_is_its_own_verdict(executor: httpx.AsyncClient) -> None:
    code = "chunks = []\nwhile True:\n    chunks.append(bytearray(10**7))"
    result = await run(executor, code, memory_mb=256)
    assert result["status"] == "memory_limit_exceeded", result
    assert "Memory limit of 256 MB exceeded" in result["error"]
    assert result["peak_memory_kb"] <= 300 * 1024
    await assert_host_unharmed(executor)


@pytest.mark.parametrize(
    ("language", "code"),
    [
        ("python", "x = bytearray(2 * 10**9)"),
        ("cpp", "#include <vector>\nint main(){std::vector<char> v(1500000000UL, 1); return v[3];}"),
        ("javascript", "console.log(Buffer.alloc(1.5e9).length)"),
    ],
)
async def test_one_allocation_far_past_the_limit_is_its_own_verdict(
    executor: httpx.AsyncClient, language: str, code: str
) -> None:
    """With cgroups the address-space limit refuses it before the cgroup sees any of it."""
    result = await run(executor, code, language=language, memory_mb=256)
    assert result["status"] == "memory_limit_exceeded", result
    assert "Memory limit of 256 MB exceeded" in result["error"]
    await assert_host_unharmed(executor)


async def test_memory_spread_over_processes_is_capped_together(executor: httpx.AsyncClient) -> None:
    code = """
import os, time
for _ in range(6):
    if os.fork() == 0:
        chunks = [bytearray(10**7) for _ in range(10)]  # 100 MB each
        for c in chunks:
            c[::4096] = b"x" * len(c[::4096])
        time.sleep(5)
        os._exit(0)
for _ in range(6):
    os.wait()
"""
    result = await run(executor, code, memory_mb=256)
    health = (await executor.get("/health")).json()
    if health["limits_enforced_by"] == "rlimit":
        pytest.skip("per-process rlimits cannot cap memory across processes; cgroups are not available")
    assert result["peak_memory_kb"] <= 270 * 1024, result
    await assert_host_unharmed(executor)


@pytest.mark.parametrize("place", ["/tmp", "/dev/shm"])
async def test_disk_fill_of_every_writable_place(executor: httpx.AsyncClient, place: str) -> None:
    code = f"""
import os
written = 0
try:
    for n in range(1000):
        with open("{place}/fill-%d" % n, "wb") as f:
            for _ in range(16):
                f.write(b"x" * 1024 * 1024)
                written += 1024 * 1024
except OSError as e:
    print("stopped", written // 2**20, e.errno)
"""
    result = await run(executor, code)
    assert result["status"] == "completed", result
    assert int(result["output"].split()[1]) <= 100
    await assert_host_unharmed(executor)


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
async def test_output_flood_is_cut_off_without_buffering(
    executor: httpx.AsyncClient, executor_service: ExecutorService, stream: str
) -> None:
    before = rss_kb(executor_service.pid)
    code = f"import sys\nchunk = 'x' * 65536\nwhile True:\n    sys.{stream}.write(chunk)"
    result = await run(executor, code, timeout=30)
    assert result["status"] == "output_limit_exceeded", result
    assert result["runtime_ms"] < 10_000
    assert len(result["output" if stream == "stdout" else "error"]) <= 64 * 1024 + 200
    assert rss_kb(executor_service.pid) - before < 20 * 1024
    await assert_host_unharmed(executor)


async def test_busy_loop_past_the_cpu_limit(executor: httpx.AsyncClient) -> None:
    result = await run(executor, "while True:\n    pass", timeout=2)
    assert result["status"] == "timeout" and result["timed_out"] is True
    if result["limits_enforced_by"] != "rlimit":  # rusage loses processes killed at the wall limit
        assert 1500 <= result["cpu_ms"] <= 4000
    await assert_host_unharmed(executor)


async def test_sleep_past_the_wall_limit(executor: httpx.AsyncClient) -> None:
    result = await run(executor, "import time\ntime.sleep(60)", timeout=1)
    assert result["status"] == "timeout" and result["cpu_ms"] < 500
    await assert_host_unharmed(executor)


async def test_detached_children_that_ignore_sigterm_and_zombies_do_not_survive(
    executor: httpx.AsyncClient,
) -> None:
    code = """
import os, signal, time
for _ in range(3):
    if os.fork() == 0:
        os.setsid()
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if os.fork() == 0:
            time.sleep(120)
        os._exit(0)
if os.fork() == 0:
    os._exit(0)          # a zombie: never waited for
print("parent leaves")
"""
    result = await run(executor, code)
    assert result["status"] == "completed" and result["output"] == "parent leaves\n"
    await assert_host_unharmed(executor)


async def test_kill_is_total_even_for_a_grandchild_ignoring_signals(executor: httpx.AsyncClient) -> None:
    eval_id = f"kill-{uuid.uuid4().hex[:8]}"
    code = """
import os, signal, time
if os.fork() == 0:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if os.fork() == 0:
        os.setsid()
        time.sleep(120)
    time.sleep(120)
time.sleep(120)
"""
    pending = asyncio.create_task(run(executor, code, eval_id=eval_id, timeout=30))
    for _ in range(100):
        # bwrap, its init, the program, its child and grandchild
        if len(sandbox_processes().splitlines()) >= 5:
            break
        await asyncio.sleep(0.05)
    assert (await executor.post(f"/kill/{eval_id}")).status_code == 200
    assert (await pending)["status"] == "cancelled"
    await assert_host_unharmed(executor)


async def test_host_files_secrets_and_other_runs_are_out_of_reach(executor: httpx.AsyncClient) -> None:
    secret_file = f"secret-{uuid.uuid4().hex}"
    holder = asyncio.create_task(
        run(executor, f"open('/tmp/{secret_file}', 'w').write('mine')\nimport time\ntime.sleep(2)")
    )
    await asyncio.sleep(0.5)
    code = f"""
import os
found = []
for path in ["/etc/shadow", "/etc/passwd", "/root/.bash_history", "/proc/1/environ"]:
    try:
        found.append(open(path).read()[:50])
    except OSError:
        pass
print("environ" if "{EXECUTOR_SECRET}" in str(found) + str(dict(os.environ)) else "no secret")
print(os.path.exists("/tmp/{secret_file}"))
for pid in os.listdir("/proc"):
    if pid.isdigit():
        try:
            print(open(f"/proc/{{pid}}/cmdline").read().replace("\\0", " "))
        except OSError:
            pass
"""
    result = await run(executor, code)
    await holder
    lines = result["output"].splitlines()
    assert lines[0] == "no secret" and lines[1] == "False"
    assert not any("sleep" in line or "uvicorn" in line or "app.cli" in line for line in lines[2:])
    await assert_host_unharmed(executor)


async def test_privileged_calls_are_refused(executor: httpx.AsyncClient) -> None:
    code = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
results = {}
results["mount"] = libc.mount(b"none", b"/tmp", b"tmpfs", 0, None)
results["unshare_user"] = libc.unshare(0x10000000)
results["unshare_net"] = libc.unshare(0x40000000)
results["setuid_0"] = libc.setuid(0)
results["chroot"] = libc.chroot(b"/tmp")
results["reboot"] = libc.reboot(0x4321FEDC)
results["ptrace_attach_1"] = libc.ptrace(16, 1, None, None)
results["ptrace_traceme"] = libc.ptrace(0, 0, None, None)
results["keyctl"] = libc.syscall(250, 0, -3)            # KEYCTL_GET_KEYRING_ID, session keyring
results["io_uring_setup"] = libc.syscall(425, 8, ctypes.create_string_buffer(120))
results["bpf"] = libc.syscall(321, 0, None, 0)
print(sorted(k for k, v in results.items() if v >= 0))
"""
    result = await run(executor, code)
    assert result["status"] == "completed", result
    assert result["output"] == "[]\n"
    await assert_host_unharmed(executor)


async def test_only_socket_families_confined_by_the_namespaces_open(executor: httpx.AsyncClient) -> None:
    """AF_VSOCK ignores network namespaces: in a virtual machine it reaches the machine's host."""
    code = """
import ctypes, socket
libc = ctypes.CDLL(None, use_errno=True)
def opens(family, kind):
    fd = libc.syscall(41, ctypes.c_uint64(family), kind, 0)  # socket(2), the register as given
    return "opens" if fd >= 0 else ctypes.get_errno()
print({
    "vsock": opens(40, socket.SOCK_STREAM),
    "vsock, high bits set": opens((1 << 32) | 40, socket.SOCK_STREAM),
    "alg": opens(38, socket.SOCK_SEQPACKET),
    "packet": opens(17, socket.SOCK_DGRAM),
    "unix": opens(1, socket.SOCK_STREAM),
    "inet": opens(2, socket.SOCK_STREAM),
    "inet6": opens(10, socket.SOCK_DGRAM),
    "netlink": opens(16, socket.SOCK_RAW),
})
"""
    result = await run(executor, code)
    assert result["status"] == "completed", result
    refused = 97  # EAFNOSUPPORT
    assert result["output"] == str({
        "vsock": refused, "vsock, high bits set": refused, "alg": refused, "packet": refused,
        "unix": "opens", "inet": "opens", "inet6": "opens", "netlink": "opens",
    }) + "\n"  # fmt: skip
    await assert_host_unharmed(executor)


async def test_direct_io_and_linux_aio_are_refused(executor: httpx.AsyncClient) -> None:
    """O_DIRECT reads queue on the disk itself: eight threads of them held a slot 24 s past a
    2 s time-out in uninterruptible sleep. Linux AIO contexts are a host-wide budget
    (fs.aio-max-nr): one run took all 65536 and the host's own io_setup failed."""
    code = """
import ctypes, fcntl, os
libc = ctypes.CDLL(None, use_errno=True)
def errno_of(call):
    try:
        call()
        return "allowed"
    except OSError as exc:
        return exc.errno
def syscall(number, *args):
    if libc.syscall(number, *args) < 0:
        raise OSError(ctypes.get_errno(), "refused")
fd = os.open("/usr/bin/python3", os.O_RDONLY)
context, usr_bin = ctypes.c_ulong(0), os.open("/usr/bin", os.O_RDONLY)
print({
    "open O_DIRECT": errno_of(lambda: syscall(2, b"/usr/bin/python3", os.O_RDONLY | os.O_DIRECT)),
    "openat O_DIRECT": errno_of(lambda: os.open("python3", os.O_RDONLY | os.O_DIRECT, dir_fd=usr_bin)),
    "fcntl O_DIRECT": errno_of(lambda: fcntl.fcntl(fd, fcntl.F_SETFL, os.O_DIRECT)),
    "openat2": errno_of(lambda: syscall(437, -100, b"/usr/bin/python3", ctypes.create_string_buffer(24), 24)),
    "io_setup": errno_of(lambda: syscall(206, 64, ctypes.byref(context))),
    "io_submit": errno_of(lambda: syscall(209, 0, 0, None)),
    "plain open": errno_of(lambda: os.close(os.open("/usr/bin/python3", os.O_RDONLY))),
    "fcntl O_NONBLOCK": errno_of(lambda: fcntl.fcntl(fd, fcntl.F_SETFL, os.O_NONBLOCK)),
})
"""
    result = await run(executor, code)
    assert result["status"] == "completed", result
    einval, enosys = 22, 38
    assert result["output"] == str({
        "open O_DIRECT": einval, "openat O_DIRECT": einval, "fcntl O_DIRECT": einval,
        "openat2": enosys, "io_setup": enosys, "io_submit": enosys,
        "plain open": "allowed", "fcntl O_NONBLOCK": "allowed",
    }) + "\n"  # fmt: skip
    await assert_host_unharmed(executor)


async def test_disk_reads_are_capped_per_run(executor: httpx.AsyncClient) -> None:
    """Reading the host's disk past its cache for 2 s (each MiB dropped from the page cache
    before it is read): uncapped, one run read ~860 MB/s here with O_DIRECT and the host's own
    reads became ~60 times slower."""
    assert (await executor.get("/health")).json()["disk_reads_capped"]
    code = """
import mmap, os, time
files = [e for d in ("/usr/lib/x86_64-linux-gnu", "/usr/bin") for e in os.scandir(d) if e.is_file()]
biggest = max(files, key=lambda e: e.stat().st_size).path
fd = os.open(biggest, os.O_RDONLY)
buffer, size, total, started = mmap.mmap(-1, 1 << 20), os.fstat(fd).st_size, 0, time.monotonic()
while time.monotonic() - started < 2:
    offset = total % (size - (1 << 20)) // 4096 * 4096
    os.posix_fadvise(fd, offset, 1 << 20, os.POSIX_FADV_DONTNEED)
    total += os.preadv(fd, [buffer], offset)
print(round(total / (time.monotonic() - started) / 2**20))
"""
    result = await run(executor, code, timeout=10)
    assert result["status"] == "completed", result
    assert int(result["output"]) < 2 * 32  # MB/s: the default SANDBOX_READ_MB_PER_S is 32
    await assert_host_unharmed(executor)


async def test_planted_links_are_never_followed(executor: httpx.AsyncClient) -> None:
    code = """
import os
os.symlink("/etc/shadow", "/tmp/main")
os.symlink("/etc", "/tmp/out")
try:
    os.link("/usr/bin/python3", "/tmp/hard")
except OSError as e:
    print("hard link refused", e.errno)
"""
    result = await run(executor, code)
    assert result["status"] == "completed"
    c_result = await run(executor, '#include "/etc/shadow"\nint main(){return 0;}', language="c")
    assert c_result["status"] == "compile_error"
    assert Path("/etc/shadow").stat().st_uid == 0
    await assert_host_unharmed(executor)


async def test_a_run_cannot_forge_its_verdict(executor: httpx.AsyncClient) -> None:
    cpu_limit = await run(executor, "exit 152", language="bash")  # 128 + SIGXCPU, without the CPU
    assert cpu_limit["status"] == "failed" and cpu_limit["exit_code"] == 152


async def test_no_pseudo_terminals_from_the_host_pool(executor: httpx.AsyncClient) -> None:
    code = "import os\ntry:\n    os.openpty()\n    print('pty')\nexcept OSError:\n    print('refused')"
    assert (await run(executor, code))["output"] == "refused\n"


async def test_a_cpu_hog_with_many_sessions_cannot_starve_another_run(executor: httpx.AsyncClient) -> None:
    hog = """
import os
for _ in range(40):
    if os.fork() == 0:
        os.setsid()
        break
while True:
    pass
"""
    hogging = asyncio.create_task(run(executor, hog, timeout=6))
    await asyncio.sleep(0.5)
    small = await run(executor, "print(sum(range(3 * 10**7)))", timeout=5)
    assert small["status"] == "completed", small
    assert (await hogging)["status"] == "timeout"
    await assert_host_unharmed(executor)


def tcp_memory_pages() -> int:
    line = next(x for x in Path("/proc/net/sockstat").read_text().splitlines() if x.startswith("TCP:"))
    return int(line.split("mem")[1].split()[0])


async def test_socket_buffers_on_the_runs_loopback_count_against_it(executor: httpx.AsyncClient) -> None:
    code = """
import socket, time
server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen(64)
held = []
for _ in range(30):
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    client.connect(server.getsockname())
    client.setblocking(False)
    try:
        while True:
            client.send(b"x" * 65536)
    except (BlockingIOError, OSError):
        pass
    held.append(client)
print("filled")
time.sleep(3)
"""
    before = tcp_memory_pages()
    pending = asyncio.create_task(run(executor, code, memory_mb=64))
    peak = before
    while not pending.done():
        peak = max(peak, tcp_memory_pages())
        await asyncio.sleep(0.1)
    assert (peak - before) * 4096 < 96 * 1024 * 1024, (before, peak)
    await assert_host_unharmed(executor)


async def test_host_wide_facts_in_proc_are_hidden(executor: httpx.AsyncClient) -> None:
    """The host's boot arguments, kernel build and symbols, other tenants' AIO and pressure,
    and pid 1's command line (naming the executor's staging folder) read as nothing."""
    code = """
import os
def shown(path):
    try:
        if os.path.isdir(path):
            return sorted(os.listdir(path))
        with open(path, "rb") as f:
            return len(f.read(4096))
    except OSError:
        return 0
paths = ["/proc/cmdline", "/proc/config.gz", "/proc/kallsyms", "/proc/sys/fs/aio-nr",
         "/proc/1/cmdline", "/proc/pressure"]
print({p: shown(p) for p in paths if os.path.exists(p)})
print(len(open("/proc/self/status").read()) > 0)
"""
    result = await run(executor, code)
    assert result["status"] == "completed", result
    shown, own_status = result["output"].splitlines()
    assert all(v in (0, []) for v in ast.literal_eval(shown).values()), shown
    assert "/proc/cmdline" in shown and "/proc/1/cmdline" in shown
    assert own_status == "True"  # a run's own /proc entries still work
    await assert_host_unharmed(executor)


async def test_time_outs_are_judged_on_cpu_time_and_wall_time_is_a_multiple_of_it(
    executor: httpx.AsyncClient,
) -> None:
    """With more runs than cores a busy machine stretches an honest run's wall time (3.6-5x
    beside seven busy loops) but not its CPU time: `timeout` limits CPU time, the wall clock
    gets WALL_TIME_FACTOR times it, and the verdict says which limit ended the run."""
    spins = await run(executor, "while True: pass", timeout=1)
    assert spins["status"] == "timeout", spins
    assert spins["error"] == "CPU time limit of 1s exceeded"  # no stray newline before it
    assert 900 <= spins["cpu_ms"] < 2000
    forks = "import os\nfor _ in range(3):\n    if os.fork() == 0:\n        break\nwhile True: pass"
    together = await run(executor, forks, timeout=1)  # each process's rlimit alone would allow 4 s
    assert together["status"] == "timeout" and together["error"] == "CPU time limit of 1s exceeded", together
    assert together["cpu_ms"] < 2000
    waits = await run(executor, "import time\ntime.sleep(1.5)\nprint('woke')", timeout=1)
    assert (waits["status"], waits["output"]) == ("completed", "woke\n"), waits
    sleeps = await run(executor, "import time\ntime.sleep(60)", timeout=1)
    assert sleeps["status"] == "timeout" and sleeps["error"].startswith(
        "Wall-clock time limit of 3s exceeded"
    )
    assert sleeps["runtime_ms"] < 3000 + 1500
    await assert_host_unharmed(executor)


# Attacks on the fork servers (executor/fork_server.py): each Python run is a fork of its slot's
# server, so a run's memory starts as a copy of the server's, and the next run of its slot is
# forked from the same server.


def idle_fork_servers() -> list[str]:
    """The executor's fork servers waiting for a request (their interpreters' pids)."""
    ps = subprocess.run(
        ["ps", "-ww", "-eo", "uid=,pid=,ppid=,wchan:32=,args="], capture_output=True, text=True
    )
    rows = [line.split(None, 4) for line in ps.stdout.splitlines() if int(line.split()[0]) in SANDBOX_UIDS]
    waiting = {row[1] for row in rows if row[3] == IDLE_SERVER_WAIT}
    # a server waits on its socket; so does its prepared init (its parent: the server)
    return sorted(row[1] for row in rows if row[1] in waiting and row[2] not in waiting)


async def servers_settled(count: int | None = None) -> list[str]:
    for _ in range(100):
        found = idle_fork_servers()
        if found and (count is None or len(found) == count):
            return found
        await asyncio.sleep(0.05)
    return idle_fork_servers()


async def test_a_run_cannot_find_signal_or_read_its_fork_server(executor: httpx.AsyncClient) -> None:
    before = await servers_settled()
    assert before, "the executor under test has no fork server"
    code = """
import os, signal
pids = sorted(int(p) for p in os.listdir('/proc') if p.isdigit())
print(pids[:2], os.getpid())
readable = []
for name in ('mem', 'environ', 'maps', 'cmdline', 'fd'):
    try:
        path = f'/proc/1/{name}'
        os.listdir(path) if name == 'fd' else open(path, 'rb').read(1)
        readable.append(name)
    except OSError:
        pass
print(readable)
print([l.split()[1] for l in open('/proc/1/status') if l.startswith('CapEff')])
for target in (1, -1):
    try:
        os.kill(target, signal.SIGKILL)
    except OSError as exc:
        print(target, type(exc).__name__)
print('still here')
"""
    result = await run(executor, code)
    lines = result["output"].splitlines()
    assert lines[0] == "[1, 2] 2", result  # its own pid namespace: its init and itself
    assert lines[1] == "[]" and lines[2] == "['0000000000000000']"  # an init it cannot open, with nothing
    # kill(1) is ignored (its init, from inside); -1 finds nothing else it may signal
    assert lines[3:] == ["-1 ProcessLookupError", "still here"] and result["status"] == "completed"
    await assert_host_unharmed(executor)
    assert await servers_settled(len(before)) == before  # the same servers, serving


def memory_holds(pid: int, needle: bytes) -> bool:
    """Whether `needle` is anywhere in the readable memory of process `pid` (read as root)."""
    found = False
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb") as mem:
        for line in maps:
            span, perms = line.split()[:2]
            if perms.startswith("r"):
                start, end = (int(x, 16) for x in span.split("-"))
                try:
                    mem.seek(start)
                    found = found or needle in mem.read(end - start)
                except (OSError, OverflowError, ValueError):
                    pass
    return found


async def test_a_run_holds_nothing_of_its_server(
    executor: httpx.AsyncClient, executor_service: ExecutorService
) -> None:
    """A run's memory starts as its server's, so the server must hold no secret; and no
    descriptor of the server's (its socket to the executor) may be left open in a run."""
    assert memory_holds(executor_service.pid, EXECUTOR_SECRET.encode())  # the search finds it where it is
    servers = await servers_settled()
    assert servers and not any(memory_holds(int(pid), EXECUTOR_SECRET.encode()) for pid in servers)
    result = await run(executor, "import os; print(sorted(os.listdir('/proc/self/fd')))")
    assert result["output"] == "['0', '1', '2', '3']\n", result  # 3: the listing's own
    await assert_host_unharmed(executor)


async def test_a_run_cannot_exhaust_or_poison_its_server(executor: httpx.AsyncClient) -> None:
    before = await servers_settled()
    poison = """
import builtins, os, sys, json, signal
open('/tmp/left', 'w').write('x'); open('/dev/shm/left', 'w').write('x')
os.environ['LEFT'] = '1'; json.dumps = None; builtins.open = None
signal.signal(signal.SIGTERM, signal.SIG_IGN)
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        import time; time.sleep(60)
    os._exit(0)
blobs = [bytearray(10**7) for _ in range(20)]
"""
    for _ in range(3):  # every slot's server, likely
        await asyncio.gather(*(run(executor, poison, memory_mb=256) for _ in range(4)))
    check = (
        "import os, json, sys\n"
        "print(os.listdir('/tmp'), os.listdir('/dev/shm'), 'LEFT' in os.environ, json.dumps(1),"
        " open is not None)"
    )
    results = await asyncio.gather(*(run(executor, check) for _ in range(8)))
    assert {r["output"] for r in results} == {"[] [] False 1 True\n"}, results
    await assert_host_unharmed(executor)
    assert await servers_settled(len(before)) == before


async def test_a_new_user_namespace_is_refused_even_through_clone(executor: httpx.AsyncClient) -> None:
    """The seccomp filter refuses unshare; clone with CLONE_NEWUSER meets the namespace limit
    the fork server sets (bwrap's --disable-userns does the same for a cold run)."""
    code = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
pid = libc.syscall(56, 0x10000000 | 17, 0, 0, 0, 0)   # clone(CLONE_NEWUSER | SIGCHLD)
if pid == 0:
    os._exit(0)
print(pid, ctypes.get_errno() != 0)
print(open('/proc/sys/user/max_user_namespaces').read().strip())
"""
    result = await run(executor, code)
    assert result["output"].splitlines() == ["-1 True", "0"], result
    await assert_host_unharmed(executor)


async def test_a_run_cannot_watch_what_other_tenants_open_in_the_shared_usr(
    executor: httpx.AsyncClient,
) -> None:
    """/usr is one directory tree for every slot: inotify on it would show one run, with timing,
    each module another tenant's Python imports and each header its compile includes."""
    watcher = """
import ctypes, glob, os, platform, select, struct, time
libc = ctypes.CDLL(None, use_errno=True)
def refused(result):
    return ctypes.get_errno() if result < 0 else "allowed"
IN_OPEN = 0x20
tries = {"inotify_add_watch": refused(libc.inotify_add_watch(0, b"/usr", IN_OPEN))}
if platform.machine() == "x86_64":
    old = libc.syscall(253)  # inotify_init, which arm64 does not have
    tries["inotify_init"] = refused(old)
fd = libc.inotify_init1(os.O_NONBLOCK)
tries["inotify_init1"] = refused(fd)
print(tries)
seen = set()
if fd >= 0:
    for folder in ["/usr/include", *glob.glob("/usr/lib/python3*"), *glob.glob("/usr/lib/python3*/__*")]:
        libc.inotify_add_watch(fd, folder.encode(), IN_OPEN)
    ends = time.monotonic() + 4
    while time.monotonic() < ends:
        select.select([fd], [], [], 0.1)
        try:
            events = os.read(fd, 65536)
        except BlockingIOError:
            continue
        while events:
            _, _, _, size = struct.unpack_from("iIII", events)
            seen.add(events[16 : 16 + size].rstrip(b"\\0").decode())
            events = events[16 + size :]
print(sorted(name for name in seen if "mailbox" in name))
"""
    watching = asyncio.create_task(run(executor, watcher, timeout=10))
    await asyncio.sleep(1.5)  # its watches are in place
    tenant = await run(executor, "import mailbox\nprint('imported')")  # another slot, another uid
    assert tenant["output"] == "imported\n", tenant
    result = await watching
    assert result["status"] == "completed", result
    tries, seen = result["output"].splitlines()
    assert seen == "[]", result  # mailbox.cpython-3*.pyc: what the other run imported
    assert set(ast.literal_eval(tries).values()) == {1}, tries  # EPERM, as fanotify_init
    await assert_host_unharmed(executor)
