"""Booting Debian's user-mode Linux (`apt-get install user-mode-linux`: Linux 6.1 as an ordinary
process, no KVM) with the host's filesystem as its root, to test on a real cgroup v2 kernel.

The guest sees the host's files through hostfs (writes land on the host: the guest writes
only into the folder it is given), and runs one program as its init, which mounts what it
needs and powers the machine off when done (`tests/cgroup_v2_guest.py`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

UML = Path("/usr/bin/linux.uml")

#: UML 6.1 saves a process's FPU state with ptrace(PTRACE_{GET,SET}REGSET, NT_X86_XSTATE) into
#: a buffer sized for AVX (832 bytes); a host with AVX-512 refuses that (EFAULT: "ptrace set
#: fp regs failed, errno = 14") and the guest's init dies. Refusing those two requests (and
#: nothing else) with a seccomp filter makes UML fall back to the FXSAVE area it handles: it
#: then boots and runs shell and C programs, but on an AVX-512/AMX host (measured: Linux 6.18)
#: Python still fails ("error evaluating path") or hangs, and the tests skip there, saying so.
LAUNCHER = """
import errno, os, sys
import pyseccomp as seccomp
rules = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
for request in (0x4204, 0x4205):  # PTRACE_GETREGSET, PTRACE_SETREGSET
    rules.add_rule(seccomp.ERRNO(errno.EIO), "ptrace",
                   seccomp.Arg(0, seccomp.EQ, request), seccomp.Arg(2, seccomp.EQ, 0x202))  # NT_X86_XSTATE
rules.load()
os.execv(sys.argv[1], sys.argv[1:])
"""


@dataclass
class Boot:
    returncode: int | None
    console: str
    seconds: float


def unavailable() -> str | None:
    """Why user-mode Linux cannot run here, or None."""
    if not UML.exists():
        return f"{UML} is missing: apt-get install user-mode-linux (./dev test installs it)"
    if sys.platform != "linux" or os.uname().machine != "x86_64":
        return "Debian's user-mode Linux runs on x86_64 Linux only"
    return None


def boot(init: list[str], memory_mb: int, timeout_s: float) -> Boot:
    """Boot the guest with `init` (argv) as its pid 1; its console is returned when it powers
    off (or is killed at `timeout_s`). UML's memory file and control folder go in a temporary
    folder of their own."""
    import time

    with tempfile.TemporaryDirectory(prefix="crucible-uml-") as scratch:
        script = Path(scratch) / "init"
        script.write_text("#!/bin/sh\nexec " + " ".join(_quote(arg) for arg in init) + "\n")
        script.chmod(0o755)
        argv = [sys.executable, "-c", LAUNCHER, str(UML), f"mem={memory_mb}M",
                "rootfstype=hostfs", "rootflags=/", "rw", f"init={script}", f"uml_dir={scratch}",
                "con=null", "con0=fd:0,fd:1"]  # fmt: skip
        env = {"PATH": "/usr/bin:/bin", "TMPDIR": "/dev/shm", "HOME": scratch}
        began = time.monotonic()
        # stdin a pipe nobody writes: UML's console reads it (/dev/null cannot be polled)
        with subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, env=env, start_new_session=True) as uml:  # fmt: skip
            try:
                output, _ = uml.communicate(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(uml.pid, 9)
                output, _ = uml.communicate()
            return Boot(uml.returncode, output.decode(errors="replace"), time.monotonic() - began)


def _quote(arg: str) -> str:
    return "'" + arg.replace("'", "'\\''") + "'"


def fresh_folder() -> Path:
    """A folder the guest may write its results into."""
    return Path(tempfile.mkdtemp(prefix="crucible-uml-out-"))


def remove(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
