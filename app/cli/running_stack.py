"""How commands run from a folder find the stack `crucible up` runs from that same folder.

`crucible up` keeps its embedded Valkey's port in the data folder, so the port stays the same
across restarts unless something else has taken it. Once every piece answers, it records where
each piece listens in `<CRUCIBLE_DATA_DIR>/stack.json`, and it removes that file when it stops.
`crucible keys|migration|submit` read the file, so they reach that stack without being told,
and they say so plainly when no stack is running there.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from app.cli.ports import port_is_free
from evaluations.settings import ConfigError, Settings

STACK_FILE = "stack.json"
#: The embedded Valkey's port, kept between starts (in its own data folder).
VALKEY_PORT_FILE = Path("valkey") / "port"


class NoRunningStack(ConfigError):
    """No Redis to talk to: neither REDIS_URL nor a live `crucible up` from this folder."""


@dataclass(frozen=True)
class RunningStack:
    """Where the pieces of one `crucible up` answer."""

    pid: int
    redis_url: str
    namespace: str
    api_url: str
    dashboard_url: str
    executor_url: str


def stack_file(settings: Settings) -> Path:
    return settings.data_dir / STACK_FILE


def record(settings: Settings, stack: RunningStack) -> None:
    """Write the stack file (0600: a Redis URL may hold a password), replacing it atomically."""
    path = stack_file(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.touch(mode=0o600)
    temporary.write_text(json.dumps(asdict(stack), indent=2) + "\n")
    temporary.replace(path)


def forget(settings: Settings) -> None:
    """Remove the stack file if this process wrote it."""
    path = stack_file(settings)
    recorded = _read(path)
    if recorded is not None and recorded.pid == os.getpid():
        path.unlink(missing_ok=True)


def find(settings: Settings) -> RunningStack | None:
    """The stack recorded in this data folder, if its `crucible up` still runs."""
    recorded = _read(stack_file(settings))
    return recorded if recorded is not None and _is_crucible_up(recorded.pid) else None


def admin_redis(settings: Settings) -> tuple[str, str]:
    """The Redis URL and key namespace an admin command works on: REDIS_URL's if set, else
    those of the stack running from this folder; else NoRunningStack, saying what to do."""
    if settings.redis_url:
        return settings.redis_url, settings.namespace
    stack = find(settings)
    if stack is not None:
        return stack.redis_url, stack.namespace
    path = stack_file(settings)
    recorded = _read(path)
    what = (
        f"the `crucible up` recorded in {path} (pid {recorded.pid}) is no longer running"
        if recorded is not None
        else f"no `crucible up` is running from this folder ({path} does not exist)"
    )
    raise NoRunningStack(
        f"{what}; start the stack with `./dev up` (or `crucible up`) here, or set REDIS_URL to "
        "the deployment's Redis"
    )


def remembered_valkey_port(settings: Settings) -> int | None:
    """The port the embedded Valkey had last time, if it is free now."""
    try:
        port = int((settings.data_dir / VALKEY_PORT_FILE).read_text())
    except (OSError, ValueError):
        return None
    return port if port_is_free("127.0.0.1", port) else None


def remember_valkey_port(settings: Settings, port: int) -> None:
    path = settings.data_dir / VALKEY_PORT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{port}\n")


def without_password(url: str) -> str:
    """A Redis URL fit to print: `redis://:secret@host` → `redis://***@host`."""
    return re.sub(r"//[^/@]*@", "//***@", url)


def _read(path: Path) -> RunningStack | None:
    try:
        return RunningStack(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _is_crucible_up(pid: int) -> bool:
    """Whether `pid` is a live `crucible up` (not a process that reused a dead one's pid)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"up" in argv and any(b"crucible" in part or part == b"app.cli" for part in argv)
