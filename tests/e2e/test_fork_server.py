"""Fork servers (executor/fork_server.py): a forked Python run answers as a cold one does, with
the same isolation, and nothing of one run reaches the next; a server that misbehaves or is gone
means a cold start, never a failure of the submission."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import subprocess
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import pytest

from bench.stack import free_uid_base
from evaluations.languages import registry
from executor.app import open_sandbox, request_limits
from executor.fork_server import EXTRA_PROCESSES
from executor.sandbox import Sandbox
from executor.verdict import RunResult
from infra.settings import Settings

PYTHON = registry("/usr/bin/python3")["python"]
#: What a cold run and a forked one must answer alike (status, exit code, signal, output, error).
PROGRAMS = {
    "hello": "print('hello world')",
    "exit code": "import sys; sys.exit(3)",
    "exit message": "import sys; sys.exit('bye')",
    "exception": "def f():\n    raise ValueError('boom')\nf()",
    "one-liner error": "1/0",
    "syntax error": "x = (",
    "keyboard interrupt": "raise KeyboardInterrupt",
    "as a script": "import sys; print(__name__, __file__, sys.argv, sys.path[0], __spec__)",
    "its own file": "print(open(__file__).read())",
    "stderr and unicode": "import sys; print('héllo ✓'); print('warn', file=sys.stderr)",
    "inspect": "import inspect\ndef f():\n    return 1\nprint(inspect.getsource(f))",
    "custom excepthook": "import sys\nsys.excepthook = lambda *a: print('hooked', a[0])\nraise KeyError(1)",
    "threads and atexit": (
        "import atexit, threading, time\natexit.register(print, 'atexit')\n"
        "threading.Thread(target=lambda: (time.sleep(0.1), print('thread'))).start()"
    ),
    "__del__ at exit": "class A:\n    def __del__(self):\n        print('deleted')\na = A()",
    "pickle of a __main__ class": (
        "import pickle\nclass P:\n    pass\nprint(type(pickle.loads(pickle.dumps(P()))).__name__)"
    ),
    "identity": (
        "import os, socket\nprint(os.getuid() == os.geteuid() == os.getgid(), os.getgroups(), os.getpid(),"
        " os.getppid(), os.getcwd(),"
        " socket.gethostname(), sorted(os.environ.items()))"
    ),
    "privileges": (
        "print([l for l in open('/proc/self/status') if l.startswith(('Cap', 'NoNewPrivs', 'Seccomp:'))])"
    ),
    "what it sees": (
        "import os\nprint(sorted(os.listdir('/')), os.listdir('/sandbox'), os.listdir('/tmp'),"
        " sorted(p for p in os.listdir('/proc') if p.isdigit()), open('/proc/self/cmdline').read(),"
        " os.listdir('/proc/pressure'), open('/proc/cmdline').read())"
    ),
    "namespaces are its own": (
        "import socket\ns = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen()\n"
        "c = socket.create_connection(s.getsockname()); print(len(open('/proc/net/dev').readlines()))"
    ),
    "rlimits": (
        "import resource as r\nprint([r.getrlimit(getattr(r, n)) for n in "
        "('RLIMIT_CPU', 'RLIMIT_AS', 'RLIMIT_FSIZE', 'RLIMIT_NOFILE', 'RLIMIT_CORE')])"
    ),
    "descriptors": "import os; print(sorted(os.listdir('/proc/self/fd')))",
    "stdin": "import sys; print(sys.stdin.read(), sys.stdin.seekable())",
}


#: Processes of an idle slot's uid: the server's bwrap, the init of the server's own pid
#: namespace, the server, and the next run's init, prepared.
IDLE_SLOT = 4


def uids_in_use(uids: Sequence[int]) -> list[str]:
    """Processes on the host running as one of `uids` (a sandbox's own: see executor/uid_range.py)."""
    ps = subprocess.run(["ps", "-ww", "-eo", "uid=,pid=,args="], capture_output=True, text=True).stdout
    return [line for line in ps.splitlines() if int(line.split()[0]) in uids]


def server_pids(box: Sandbox) -> list[int]:
    """The fork servers' interpreters (a cold run's has `--cap-drop ALL` on its bwrap)."""
    rows = uids_in_use(box.uids)
    bwraps = {row.split()[1] for row in rows if "--cap-add ALL" in row}
    ps = subprocess.run(["ps", "-eo", "pid=,ppid=,args="], capture_output=True, text=True).stdout
    parents = {line.split()[0]: line.split()[1] for line in ps.splitlines()}
    return sorted(
        int(row.split()[1])
        for row in rows
        if row.split(None, 2)[2].startswith(PYTHON.interpreter)
        and parents.get(parents.get(row.split()[1], ""), "") in bwraps
    )


@asynccontextmanager
async def sandbox(forks: bool, slots: int = 1, runs_per_server: int = 500) -> AsyncIterator[Sandbox]:
    settings = dataclasses.replace(
        Settings.from_env(),
        sandbox_fork_server=forks,
        sandbox_fork_server_runs=runs_per_server,
        executor_concurrency=slots,
        sandbox_uid_base=free_uid_base(),
    )
    async with open_sandbox(settings) as box:
        box.limits = request_limits(settings)  # type: ignore[attr-defined]
        if forks:
            await servers_ready(box, slots)
        yield box


async def servers_ready(box: Sandbox, count: int) -> None:
    for _ in range(200):
        if box.fork_servers == count:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{box.fork_servers} of {count} fork servers ready")


async def run(box: Sandbox, code: str, **options: object) -> RunResult:
    limits = dataclasses.replace(box.limits, **options.pop("limits", {}))  # type: ignore[attr-defined,arg-type]
    result = await box.run("run", PYTHON, code, limits, **options)  # type: ignore[arg-type]
    await asyncio.sleep(0.05)  # a retired server's successor starts after the answer
    return result


def answer(result: RunResult) -> tuple[object, ...]:
    return result.status, result.exit_code, result.signal, result.output, result.error


async def test_a_forked_run_answers_as_a_cold_one() -> None:
    async with sandbox(forks=True) as forked, sandbox(forks=False) as cold:
        assert forked.fork_servers == 1 and cold.fork_servers == 0
        for name, code in PROGRAMS.items():
            options = {"stdin": "from stdin", "args": ("a", "b")} if name in ("stdin", "as a script") else {}
            ours, theirs = await run(forked, code, **options), await run(cold, code, **options)
            assert answer(ours) == answer(theirs), name
        assert forked.fork_servers == 1
        assert (await run(forked, "import os; print(os.getuid())")).output == f"{forked.uids[0]}\n"


async def test_the_process_limit_leaves_a_run_as_many_processes_as_a_cold_one() -> None:
    code = (
        "import os, resource\nn = 0\ntry:\n    while True:\n        if os.fork() == 0:\n"
        "            import time; time.sleep(5); os._exit(0)\n        n += 1\nexcept OSError:\n    print(n)"
    )
    async with sandbox(forks=True) as forked, sandbox(forks=False) as cold:
        limits = {"processes": 12}
        ours, theirs = await run(forked, code, limits=limits), await run(cold, code, limits=limits)
        assert ours.output == theirs.output and int(ours.output) > 0, (ours, theirs)
    assert EXTRA_PROCESSES > 0


async def test_nothing_a_run_does_reaches_the_next_run_of_its_slot() -> None:
    poison = (
        "import builtins, json, os, signal, sys, threading, time\n"
        "open('/tmp/mark', 'w').write('x'); open('/dev/shm/mark', 'w').write('x')\n"
        "os.environ['POISON'] = '1'; os.putenv('POISON_C', '1')\n"
        "builtins.print = lambda *a, **k: sys.stdout.write('poisoned\\n')\n"
        "json.dumps = None; sys.modules['poison'] = object(); sys.path.append('/tmp')\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "threading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n"
        "os.fork() or time.sleep(60)\n"
        "fd = os.open('/tmp/mark', os.O_RDONLY); os.set_inheritable(fd, True)\n"
    )
    check = (
        "import json, os, signal, sys, threading\n"
        "print(os.listdir('/tmp'), os.listdir('/dev/shm'), 'POISON' in os.environ,"
        " 'poison' in sys.modules, '/tmp' in sys.path, json.dumps([1]),"
        " signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, threading.active_count(),"
        " sorted(os.listdir('/proc/self/fd')), sorted(p for p in os.listdir('/proc') if p.isdigit()))"
    )
    async with sandbox(forks=True) as box:
        before = server_pids(box)
        await run(box, poison, limits={"timeout": 0.5})
        after = await run(box, check)
        assert after.output == "[] [] False False False [1] True 1 ['0', '1', '2', '3'] ['1', '2']\n", after
        assert server_pids(box) == before  # the same server forked both


async def test_a_killed_run_leaves_its_server_serving() -> None:
    async with sandbox(forks=True) as box:
        before = server_pids(box)
        pending = asyncio.create_task(box.run("killed", PYTHON, "import time; time.sleep(30)", box.limits))  # type: ignore[attr-defined]
        await asyncio.sleep(0.5)
        assert box.kill("killed")
        result = await pending
        assert (result.status, result.output) == ("cancelled", "") and result.runtime_ms < 2000
        assert (await run(box, "print('next')")).output == "next\n"
        assert server_pids(box) == before


async def test_a_dead_server_means_a_cold_start_not_a_failure() -> None:
    async with sandbox(forks=True) as box:
        (server,) = server_pids(box)
        os.kill(server, signal.SIGKILL)
        result = await run(box, "print('ran anyway')")
        assert (result.status, result.output) == ("completed", "ran anyway\n")
        await servers_ready(box, 1)  # and the slot has a new one
        assert server_pids(box) not in ([], [server])


async def test_a_server_is_replaced_after_its_runs() -> None:
    async with sandbox(forks=True, runs_per_server=2) as box:
        first = server_pids(box)
        for _ in range(2):
            assert (await run(box, "print(1)")).status == "completed"
        await servers_ready(box, 1)
        assert server_pids(box) not in ([], first)


#: Whether a Python run was forked: its mounts show its server's own files under /sandbox.
FORKED_OR_COLD = "print('forked' if 'config.json' in open('/proc/self/mounts').read() else 'cold')"


async def test_a_run_taking_its_slot_at_once_finds_the_last_runs_end_seen_to() -> None:
    """After a run its server is seen to (replaced at its runs mark, else its next init
    prepared) once the answer is on its way; a run that takes the slot before that must find
    it done, never have it done under it: the first run's work, left for later, retired the
    server the second was just forked from (it then ran cold, or failed: a 500 and a retry)."""
    async with sandbox(forks=True, runs_per_server=2) as box:
        first = server_pids(box)
        # no pause between: the second run takes the slot in the same turn of the loop
        runs = [await box.run(f"r{n}", PYTHON, FORKED_OR_COLD, box.limits) for n in range(2)]  # type: ignore[attr-defined]
        assert [r.output for r in runs] == ["forked\n", "forked\n"], runs
        await asyncio.sleep(0.05)
        await servers_ready(box, 1)
        assert server_pids(box) not in ([], first)  # replaced after its two runs, as due


async def test_a_run_cancelled_mid_run_is_killed_and_leaves_nothing_behind() -> None:
    """A worker gone mid-run: the run is killed, its end still read, so its server serves on."""
    async with sandbox(forks=True) as box:
        first = server_pids(box)
        pending = asyncio.create_task(box.run("cancelled", PYTHON, "import time; time.sleep(30)", box.limits))  # type: ignore[attr-defined]
        await asyncio.sleep(0.5)
        pending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pending
        await asyncio.sleep(0.2)
        assert server_pids(box) == first
        assert len(uids_in_use(box.uids)) == IDLE_SLOT
        assert (await run(box, "print('next')")).output == "next\n"
    for _ in range(100):
        if not uids_in_use(box.uids):
            break
        await asyncio.sleep(0.02)
    assert uids_in_use(box.uids) == []


@pytest.mark.parametrize(
    ("code", "options", "expected"),
    [
        ("x = bytearray(150 * 2**20)", {"limits": {"memory_mb": 64}}, ("memory_limit_exceeded", "")),
        ("print('a' * 100)", {"limits": {"output_bytes": 10}}, ("completed", "a" * 10)),
        ("while True: pass", {"limits": {"timeout": 1.0}}, ("timeout", "")),
        ("open('/tmp/f', 'w').write('x' * 5 * 2**20)", {"limits": {"tmpfs_mb": 2}}, ("failed", "")),
    ],
)
async def test_a_forked_run_gets_its_own_limits(
    code: str, options: dict[str, object], expected: tuple[str, str]
) -> None:
    async with sandbox(forks=True) as box:
        before = server_pids(box)
        result = await run(box, code, **options)
        assert (result.status, result.output) == expected
        assert server_pids(box) == before  # forked, not started cold


async def test_shutdown_leaves_no_server_behind() -> None:
    async with sandbox(forks=True, slots=3) as box:
        assert len(uids_in_use(box.uids)) == 3 * IDLE_SLOT
    for _ in range(100):  # the sandboxes' inits are reaped by the host's init a moment later
        if not uids_in_use(box.uids):
            break
        await asyncio.sleep(0.02)
    assert uids_in_use(box.uids) == []


#: /proc/sys as a run sees it: whether it is mounted read-only, and what opening for writing
#: the one sysctl any uid may open so (ns_last_pid, 0666: its capability is checked per write)
#: answers.
PROC_SYS = (
    "import errno, os\n"
    "print(bool(os.statvfs('/proc/sys').f_flag & os.ST_RDONLY))\n"
    "try:\n    os.open('/proc/sys/kernel/ns_last_pid', os.O_WRONLY)\n    print('opened')\n"
    "except OSError as exc:\n    print(errno.errorcode[exc.errno])"
)


async def test_proc_sys_is_read_only_in_a_forked_run_as_in_a_cold_one() -> None:
    """The kernel refuses a run's writes there anyway (files of another owner, capabilities
    it lacks); the read-only mount is a second wall, built alike on both paths."""
    async with sandbox(forks=True) as forked, sandbox(forks=False) as cold:
        before = server_pids(forked)
        ours, theirs = await run(forked, PROC_SYS), await run(cold, PROC_SYS)
        assert (ours.output, theirs.output) == ("True\nEROFS\n", "True\nEROFS\n"), (ours, theirs)
        assert server_pids(forked) == before  # forked, not started cold


#: Programs in the other languages: each is forked too, and execs its command (or its compiled
#: binary) where a cold run's bwrap would.
OTHER_LANGUAGES = {
    "bash": 'echo "$0 $(pwd) $(ls /sandbox)"; read line; echo "got $line"; exit 3',
    "c": '#include <stdio.h>\nint main(){char s[32]; scanf("%31s", s); printf("c %s\\n", s); return 4;}',
    "cpp": (
        '#include <iostream>\nint main(){std::string s; std::cin >> s; std::cout << "cpp " << s << "\\n";}'
    ),
    "javascript": "process.stdin.on('data', d => console.log('js ' + String(d).trim()))",
    "c compile error": "int main( {",
    # signals the forking interpreter ignores must not stay ignored in an exec'd program
    "bash signals": "grep -E 'SigIgn|SigBlk' /proc/$$/status; yes | head -1",
}
#: A run forked from a fork server sees the server's own files under its /sandbox in its mounts.
FORKED_MARK = "grep -c config.json /proc/self/mounts"


async def test_other_languages_are_forked_and_answer_as_cold_ones() -> None:
    available = registry("/usr/bin/python3")
    async with sandbox(forks=True) as forked, sandbox(forks=False) as cold:
        before = server_pids(forked)
        for name, code in OTHER_LANGUAGES.items():
            language = available.get(name.split()[0])
            if language is None:
                continue  # not installed here: not offered by the executor either
            answers = []
            for box in (forked, cold):
                result = await box.run(name, language, code, box.limits, stdin="word\n")  # type: ignore[attr-defined]
                answers.append(answer(result))
            assert answers[0] == answers[1], name
        bash = available["bash"]
        limits = forked.limits  # type: ignore[attr-defined]
        marks = [(await box.run("m", bash, FORKED_MARK, limits)).output for box in (forked, cold)]
        assert marks == ["1\n", "0\n"]
        assert server_pids(forked) == before


async def test_two_runs_of_one_slot_cannot_race() -> None:
    """A run leaves a detached process that kills whatever it can, and the next run of its
    slot (same uid, same server) starts at once: the first run's processes died with it."""
    hostile = (
        "import os, signal, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    signal.signal(signal.SIGTERM, signal.SIG_IGN); signal.signal(signal.SIGHUP, signal.SIG_IGN)\n"
        "    while True:\n"
        "        try:\n            os.kill(-1, signal.SIGKILL)\n        except OSError:\n            pass\n"
        "print('left it behind')"
    )
    async with sandbox(forks=True) as box:
        first = await run(box, hostile)
        second = await run(box, "import time; time.sleep(0.5); print('undisturbed')")
        assert (first.output, second.status, second.output) == (
            "left it behind\n",
            "completed",
            "undisturbed\n",
        )
        assert len(uids_in_use(box.uids)) == IDLE_SLOT


async def test_a_run_cut_off_from_its_retired_server_is_awaited_through_its_init() -> None:
    """A run answered while its processes outlive their kill (stuck on the disk) retires its
    server; its end is then its init's, read through the pidfd, so its slot stays held until
    the run's processes are really gone. Real processes stand in for the server and the init."""
    import socket
    import time

    from executor.fork_server import Forked, ForkServer, ForkServerGone

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    server = ForkServer(subprocess.Popen(["sleep", "60"], start_new_session=True), ours)
    init = subprocess.Popen(["sleep", "1"])
    with open(os.devnull, "rb") as out, open(os.devnull, "rb") as err:
        forked = Forked(server, None, out, err, os.pidfd_open(init.pid))
        waiting = asyncio.create_task(forked.wait())
        await asyncio.sleep(0.1)
        began = time.monotonic()
        assert forked.finish() is False and server.retired  # the program's end was never reported
        with pytest.raises(ForkServerGone):
            await waiting
        assert time.monotonic() - began > 0.5 and init.poll() is not None
    theirs.close()


async def test_arguments_as_large_as_the_api_accepts_go_through_the_server() -> None:
    """A run's header travels in a memfd its init alone reads: neither its size nor its
    content ever reaches the server."""
    args = tuple(f"{n}" + "x" * 4000 for n in range(64))
    async with sandbox(forks=True) as box:
        before = server_pids(box)
        result = await run(
            box, "import sys; print(len(sys.argv) - 1, sum(map(len, sys.argv[1:])))", args=args
        )
        assert result.output == f"64 {sum(map(len, args))}\n", result
        assert server_pids(box) == before  # forked, and the server still serves


@pytest.mark.parametrize("message", [b"not json", b"[1, 2]", b'{"started": false}'])
async def test_a_malformed_answer_from_a_server_leaves_no_descriptor_open(message: bytes) -> None:
    """A server that answers garbage, or carries descriptors no message asks for, is gone;
    whatever it sent is closed here. A real process stands in for the server."""
    import socket

    from executor.fork_server import ForkServer, ForkServerGone

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    server = ForkServer(subprocess.Popen(["sleep", "60"], start_new_session=True), ours)
    try:
        before = len(os.listdir("/proc/self/fd"))
        for _ in range(3):
            read, write = os.pipe()
            socket.send_fds(theirs, [message], [read, write])
            os.close(read)
            os.close(write)
            if message.startswith(b"{"):  # a message, but none that carries descriptors
                assert await server.receive_plain(1) == {"started": False}
            else:
                with pytest.raises(ForkServerGone):
                    await server.receive(1)
        assert len(os.listdir("/proc/self/fd")) == before
    finally:
        server.process.kill()
        server.process.wait()
        theirs.close()
        ours.close()
