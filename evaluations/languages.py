"""The languages the sandbox can run: adding one is one `Language` entry.

Everything a language needs must live under /usr, the only host tree mounted (read-only) in
the sandbox (without /usr/local). Every program a language names is resolved to its real file
when the registry is built (`usr_program`): Debian reaches some through /etc/alternatives
(`java`, `javac`, `cc`), which the sandbox does not have. A toolchain whose real file is not
under /usr is not offered (a rustup toolchain in a home folder, a JDK in /opt). A compiled
language compiles in a sandbox of its own (with its own limits); the binary comes back over
stdout and is handed to the run's sandbox read-only, so no host file is ever written or read on
the run's behalf.

One exception to "only /usr": Debian's JDK links its configuration into /etc (`conf/` →
/etc/java-17-openjdk), and its JVM refuses to start a program or javac without
`java.security`; that one folder is bound read-only into Java's sandboxes (`host_dirs`).
"""

from __future__ import annotations

import os
import shlex
import subprocess
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

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

#: The host tree the sandbox mounts, and the part of it hidden there.
USR = "/usr"
HIDDEN = "/usr/local"
#: In a run's or compile step's command, replaced by the JVM heap (MB) for its memory limit.
HEAP_MB = "{heap_mb}"
#: What a JVM uses beside its heap, within the run's memory limit: its own code and data,
#: metaspace, compiled code, thread stacks in use (a hello world: 35 MB resident, a 52 MB peak
#: in its cgroup with the JDK files it reads; 430 MB of arrays run in a 512 MB limit). The
#: heap gets the rest, so a program that fills it gets the JVM's own OutOfMemoryError (and
#: `memory_limit_exceeded`) before the cgroup would kill it; at least half the limit.
JVM_NATIVE_MB = 64
#: JVM options every Java phase shares: one compiler thread of the client compiler only (fast
#: start, fewer threads: a run's threads count against its process limit), the serial
#: collector, one CPU (what a run gets), no /tmp/hsperfdata file, the JVM's own messages and
#: warnings on stderr rather than mixed into the program's output, bounded reservations of
#: address space (code cache, class space: 1.2 GB by default) so it starts within the run's
#: RLIMIT_AS, and the heap sized to the memory limit. A full heap ends the JVM at once
#: ("Terminating due to java.lang.OutOfMemoryError", `memory_limit_exceeded`), however the
#: program catches errors, as a cgroup's kill would.
JVM_OPTIONS = ("-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-XX:CICompilerCount=1",
               "-XX:ActiveProcessorCount=1", "-XX:-UsePerfData", "-XX:+DisplayVMOutputToStderr",
               "-Xlog:disable", "-Xlog:all=warning:stderr", "-XX:ReservedCodeCacheSize=64m",
               "-XX:CompressedClassSpaceSize=128m", f"-Xmx{HEAP_MB}m",
               "-XX:+ExitOnOutOfMemoryError")  # fmt: skip
#: The run's stacks: 64 MB for the main thread (deep recursion, as judges give: the launcher
#: sizes it by -Xss), then the usual 1 MB (in KB) for every other thread, so each thread a
#: program starts reserves 1 MB of address space, not 64. The order matters.
JVM_STACKS = ("-Xss64m", "-XX:ThreadStackSize=1024")
#: The class a Java program starts from, in Main.java, in no package (as on judge0 and most
#: judges); other classes may be in the same file or in files beside it.
JAVA_MAIN_CLASS = "Main"


def wall_limit(timeout: float) -> float:
    """The wall-clock limit of a run whose CPU-time limit is `timeout`."""
    return timeout * WALL_TIME_FACTOR


def jvm_heap_mb(memory_mb: int) -> int:
    """The JVM heap (-Xmx) for a phase limited to `memory_mb`."""
    return max(memory_mb - JVM_NATIVE_MB, memory_mb // 2)


@dataclass(frozen=True)
class Language:
    """How to run (and maybe first compile) a submission saved as /sandbox/<file_name>."""

    name: str
    file_name: str
    run: tuple[str, ...]
    compile: tuple[str, ...] | None = None
    version_command: tuple[str, ...] | None = None
    #: Address space a runtime reserves beyond what it uses (V8 reserves ~1 GB up front): its
    #: run's and compile step's RLIMIT_AS is at least this.
    min_address_space_mb: int = 0
    #: Address space a runtime reserves on top of its heap, which is sized to the memory limit
    #: (a JVM: code cache, class space, metaspace, thread stacks, malloc arenas): RLIMIT_AS is at
    #: least the memory limit plus this, also where rlimits alone hold memory.
    reserved_address_space_mb: int = 0
    #: Host folders outside /usr its toolchain reads, bound read-only into its sandboxes (Debian's
    #: JDK configuration in /etc). A language with any starts its phases cold: a fork server's
    #: root has only /usr.
    host_dirs: tuple[str, ...] = ()

    @property
    def interpreter(self) -> str:
        return (self.compile or self.run)[0]

    def run_argv(self, memory_mb: int) -> tuple[str, ...]:
        """The run's command for a memory limit of `memory_mb` (a JVM's heap is sized to it)."""
        return _sized(self.run, memory_mb)

    def compile_argv(self, memory_mb: int) -> tuple[str, ...]:
        """The compile step's command for a memory limit of `memory_mb`."""
        return _sized(self.compile or (), memory_mb)

    @cached_property
    def version(self) -> str:
        command = self.version_command or (self.interpreter, "--version")
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return "unknown"
        lines = (done.stdout or done.stderr).strip().splitlines()
        return lines[0] if lines else "unknown"


def _sized(argv: tuple[str, ...], memory_mb: int) -> tuple[str, ...]:
    if not any(HEAP_MB in arg for arg in argv):
        return argv
    heap = str(jvm_heap_mb(memory_mb))
    return tuple(arg.replace(HEAP_MB, heap) for arg in argv)


#: The language a file is in, by its extension (what `crucible submit` sends when not told).
EXTENSIONS = {".py": "python", ".js": "javascript", ".sh": "bash", ".c": "c", ".cpp": "cpp", ".cc": "cpp",
              ".cxx": "cpp", ".java": "java", ".go": "go", ".rs": "rust"}  # fmt: skip


def _under(path: str, top: str) -> bool:
    return path == top or path.startswith(top + "/")


def usr_program(path: str) -> str | None:
    """The real file of the program `path` names, if it is one the sandbox can run: under /usr,
    not /usr/local (links are followed here, through /etc/alternatives too); else None."""
    real = os.path.realpath(path)
    if not _under(real, USR) or _under(real, HIDDEN):
        return None
    return real if os.path.isfile(real) and os.access(real, os.X_OK) else None


def registry(python_path: str) -> dict[str, Language]:
    """Known languages, keyed by the name clients send; only those installed under /usr are offered."""
    found = [_python(python_path), _node(), _bash(), *_gcc(), _java(), _go(), _rust()]
    return {lang.name: lang for lang in found if lang is not None}


def _python(python_path: str) -> Language | None:
    python = usr_program(python_path)
    return Language("python", "main.py", (python, "-u", "/sandbox/main.py")) if python else None


def _node() -> Language | None:
    node = usr_program("/usr/bin/node")
    if node is None:
        return None
    return Language("javascript", "main.js", (node, "/sandbox/main.js"), min_address_space_mb=2048)


def _bash() -> Language | None:
    bash = usr_program("/usr/bin/bash")
    return Language("bash", "main.sh", (bash, "/sandbox/main.sh")) if bash else None


def _gcc() -> list[Language]:
    flags = ("-O2", "-pipe", "-o", BINARY)
    found = []
    if gcc := usr_program("/usr/bin/gcc"):
        found.append(Language("c", "main.c", (RUN_BINARY,), (gcc, *flags, "/sandbox/main.c", "-lm")))
    if gxx := usr_program("/usr/bin/g++"):
        found.append(Language("cpp", "main.cpp", (RUN_BINARY,), (gxx, *flags, "/sandbox/main.cpp")))
    return found


def _java() -> Language | None:
    """javac compiles Main.java (and the classes it uses from files beside it) in the compile
    sandbox and `jar` packs the classes into one file, the binary: an executable jar whose
    entry point is `Main`, run with `java -jar`. java, javac and jar are one JDK's (javac's)."""
    javac = usr_program("/usr/bin/javac")
    if javac is None:
        return None
    home = Path(javac).parent.parent
    java, jar = usr_program(f"{home}/bin/java"), usr_program(f"{home}/bin/jar")
    env = usr_program("/usr/bin/env")
    host_dirs = _jdk_config(home)
    if java is None or jar is None or env is None or host_dirs is None:
        return None
    # glibc makes up to 8 malloc arenas per core, each reserving 64 MB: two keep a JVM's
    # address space (and its run's RLIMIT_AS) the same on any host
    arenas = "MALLOC_ARENA_MAX=2"
    tool = " ".join(shlex.quote("-J" + option) for option in JVM_OPTIONS)
    main = f"/tmp/classes/{JAVA_MAIN_CLASS}.class"
    missing = (f"error: no class {JAVA_MAIN_CLASS} (in no package): a Java program starts from the"
               f" main method of class {JAVA_MAIN_CLASS}, in {JAVA_MAIN_CLASS}.java")  # fmt: skip
    script = (
        f"export {arenas} && {shlex.quote(javac)} {tool} -encoding UTF-8 -d /tmp/classes"
        f" -sourcepath /sandbox /sandbox/{JAVA_MAIN_CLASS}.java"
        f" && {{ [ -f {main} ] || {{ echo {shlex.quote(missing)}; exit 1; }}; }}"
        f" && {shlex.quote(jar)} {tool} --create --file {BINARY} --main-class {JAVA_MAIN_CLASS}"
        " -C /tmp/classes ."
    )
    run = (env, arenas, java, *JVM_OPTIONS, *JVM_STACKS, "-jar", RUN_BINARY)
    return Language(
        "java", f"{JAVA_MAIN_CLASS}.java", run, ("/bin/sh", "-c", script, "javac"),
        version_command=(java, "--version"), reserved_address_space_mb=1024, host_dirs=host_dirs,
    )  # fmt: skip


def _jdk_config(home: Path) -> tuple[str, ...] | None:
    """The folder outside /usr a JDK's configuration (`conf/`) links into, to bind read-only
    (Debian's /etc/java-<N>-openjdk); () for a JDK whose configuration is its own (Temurin's).
    None where that would take more than one folder of /etc: the JDK is then not offered."""
    targets = set()
    for link in (home / "conf").rglob("*"):
        if link.is_symlink() and (real := os.path.realpath(link)) and not _under(real, USR):
            if os.path.exists(real):
                targets.add(os.path.dirname(real))
    if not targets:
        return ()
    folder = os.path.commonpath(sorted(targets))
    return (folder,) if _under(folder, "/etc") and folder != "/etc" else None


def _go() -> Language | None:
    """`go build` of main.go alone, with no C toolchain (a static binary), its caches in the
    compile sandbox's /tmp, and no network (no module is fetched; the standard library only)."""
    go, env = usr_program("/usr/bin/go"), usr_program("/usr/bin/env")
    if go is None or env is None:
        return None
    settings = ("GOCACHE=/tmp/.cache/go-build", "GOPATH=/tmp/go", "GOTOOLCHAIN=local", "GOPROXY=off",
                "GOFLAGS=", "CGO_ENABLED=0")  # fmt: skip
    build = (env, *settings, go, "build", "-o", BINARY, "/sandbox/main.go")
    return Language("go", "main.go", (RUN_BINARY,), build, version_command=(go, "version"),
                    reserved_address_space_mb=1024)  # fmt: skip


def _rust() -> Language | None:
    """rustc (2021 edition, optimised), linking with gcc named by its real file (Debian's `cc`,
    rustc's default linker, is an /etc/alternatives link)."""
    rustc = usr_program("/usr/bin/rustc")
    linker = usr_program("/usr/bin/cc") or usr_program("/usr/bin/gcc")
    if rustc is None or linker is None:
        return None
    build = (rustc, "--edition=2021", "-O", "-C", f"linker={linker}", "-o", BINARY, "/sandbox/main.rs")
    return Language("rust", "main.rs", (RUN_BINARY,), build)
