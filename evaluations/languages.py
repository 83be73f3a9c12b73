"""The languages the sandbox can run: adding one is one `Language` entry.

Everything a language needs must live under /usr, the only host tree mounted (read-only) in
the sandbox. A compiled language compiles in a sandbox of its own (with its own limits); the
binary comes back over stdout and is handed to the run's sandbox read-only, so no host file is
ever written or read on the run's behalf.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from functools import cached_property

#: Where the compile step leaves the binary, and where the run finds it.
BINARY = "/tmp/main"
RUN_BINARY = "/sandbox/main"
#: Wall-time limit of a compile step, on top of the run's own (workers wait for both).
COMPILE_TIMEOUT_SECONDS = 30.0
#: A run's `timeout` limits its CPU time; its wall-clock time is limited to this many times
#: that. A run's CPU time does not grow when the machine is busy, its wall time does: with
#: more runs than cores an honest run took 3.6-5x longer beside busy loops, and a wall-clock
#: verdict would have called that a time-out. (Sleeping or waiting for input counts only
#: against the wall limit.)
WALL_TIME_FACTOR = 3.0


def wall_limit(timeout: float) -> float:
    """The wall-clock limit of a run whose CPU-time limit is `timeout`."""
    return timeout * WALL_TIME_FACTOR


@dataclass(frozen=True)
class Language:
    """How to run (and maybe first compile) a submission saved as /sandbox/<file_name>."""

    name: str
    file_name: str
    run: tuple[str, ...]
    compile: tuple[str, ...] | None = None
    version_command: tuple[str, ...] | None = None
    #: Address space a runtime reserves beyond what it uses (V8 reserves ~1 GB up front).
    min_address_space_mb: int = 0

    @property
    def interpreter(self) -> str:
        return (self.compile or self.run)[0]

    def available(self) -> bool:
        return shutil.which(self.interpreter) is not None

    @cached_property
    def version(self) -> str:
        command = self.version_command or (self.interpreter, "--version")
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return "unknown"
        lines = (done.stdout or done.stderr).strip().splitlines()
        return lines[0] if lines else "unknown"


#: The language a file is in, by its extension (what `crucible submit` sends when not told).
EXTENSIONS = {".py": "python", ".js": "javascript", ".sh": "bash", ".c": "c", ".cpp": "cpp", ".cc": "cpp",
              ".cxx": "cpp"}  # fmt: skip


def registry(python_path: str) -> dict[str, Language]:
    """Known languages, keyed by the name clients send; only those installed are offered."""
    c_flags = ("-O2", "-pipe", "-o", BINARY)
    candidates = [
        Language("python", "main.py", (python_path, "-u", "/sandbox/main.py")),
        Language("javascript", "main.js", ("/usr/bin/node", "/sandbox/main.js"), min_address_space_mb=2048),
        Language("bash", "main.sh", ("/usr/bin/bash", "/sandbox/main.sh")),
        Language("c", "main.c", (RUN_BINARY,), ("/usr/bin/gcc", *c_flags, "/sandbox/main.c", "-lm")),
        Language("cpp", "main.cpp", (RUN_BINARY,), ("/usr/bin/g++", *c_flags, "/sandbox/main.cpp")),
    ]
    return {lang.name: lang for lang in candidates if lang.available()}
