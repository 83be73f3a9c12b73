"""Pre-started Python sandboxes: a cold start spent before the code arrives.

A warm sandbox is exactly the sandbox a cold Python run gets (same bwrap namespaces, mounts,
seccomp filter, cgroups, rlimits and uid), started ahead with an interpreter that has done its
start-up (site, encodings, imports of its own) and then blocks reading a pipe. The executor
writes the submission down that pipe and closes it; the loader below runs it as `__main__`
from `/sandbox/main.py`, as `python -u /sandbox/main.py` would. Each is used for exactly one
run and dies with it, so nothing carries over between runs; one waits per free run slot.

Only runs it can stand for take one: Python with the executor's default memory limit (the
cgroup and rlimits are set when it starts), a time-out up to the default, no stdin and no
arguments. Any other run starts cold, as before.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from evaluations.languages import Language
from executor.limits import Limits

#: The sandbox's program until its code arrives: read the code from fd argv[1], then run it as
#: the script /sandbox/main.py. It imports nothing the interpreter has not (linecache and
#: traceback would cost 7 ms of CPU a run): the source reaches linecache, and so tracebacks
#: and `inspect`, through the module's `__loader__`; only a failure imports traceback, to
#: print what a cold run prints (the interpreter's own printer reads source from the file,
#: which is not on disk), without the loader's own frame.
LOADER = r"""
import builtins, os, sys, types
fd = int(sys.argv[1])
chunks = []
while chunk := os.read(fd, 65536):
    chunks.append(chunk)
os.close(fd)
source = b"".join(chunks).decode("utf-8", "surrogateescape")
del fd, chunks, chunk
class SourceLoader:
    def __init__(self, text):
        self.text = text
    def get_source(self, name):
        return self.text
path = "/sandbox/main.py"
main = types.ModuleType("__main__")
main.__file__ = path
main.__builtins__ = builtins
main.__loader__ = SourceLoader(source)
sys.modules["__main__"] = main
sys.argv[:] = [path]
sys.path[0] = "/sandbox"
def report(exc):
    if sys.excepthook is sys.__excepthook__:
        import traceback
        traceback.print_exception(exc)
    else:
        sys.excepthook(type(exc), exc, exc.__traceback__)
    sys.exit(1)
try:
    code = compile(source, path, "exec")
except SyntaxError as exc:
    report(exc.with_traceback(None))
try:
    exec(code, main.__dict__)
except SystemExit:
    raise
except BaseException as exc:
    report(exc.with_traceback(exc.__traceback__.tb_next))
"""


@dataclass(frozen=True)
class WarmSpec:
    """What warm sandboxes are started for: one language (Python) at one set of limits."""

    language: Language
    limits: Limits

    def argv(self, code_fd: int) -> tuple[str, ...]:
        return (self.language.interpreter, "-u", "-c", LOADER, str(code_fd))

    def serves(self, language: Language, limits: Limits, stdin: str | None, args: tuple[str, ...]) -> bool:
        """Whether a run can take a warm sandbox. The time-out and output cap are enforced by
        the executor from outside, so any within the warm ones' will do (the CPU rlimit, set
        at start, is then the longer one: the wall clock still ends the run at its own time-
        out, and either ending is the `timeout` verdict); memory and the rest must match."""
        same_inside = replace(limits, timeout=self.limits.timeout, output_bytes=self.limits.output_bytes)
        return (
            language == self.language
            and not stdin
            and not args
            and same_inside == self.limits
            and limits.timeout <= self.limits.timeout
        )
