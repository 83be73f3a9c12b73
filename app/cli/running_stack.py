"""How commands run from a folder find the stack `crucible up` runs from that same folder.

`crucible up` holds a lock on `<CRUCIBLE_DATA_DIR>/up.lock` for its whole life: a second `up` on
the same folder is refused, and a stack file left by an `up` that died (or copied along with
the folder) is known for what it is, whatever became of its pid. Once every piece answers, `up`
records where each piece listens in `stack.json` there, and removes it when it stops. It also
keeps its embedded Valkey's port, so the port stays the same across restarts unless something
else has taken it. `crucible keys|migration|submit` read the stack file, so they reach that
stack without being told, and say so plainly when no stack is running there.
"""

from __future__ import annotations

import fcntl
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from app.cli.ports import port_is_free
from infra.settings import ConfigError, Settings

STACK_FILE = "stack.json"
LOCK_FILE = "up.lock"
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


def hold(settings: Settings) -> int | None:
    """Take this folder's `up` lock for the life of this process: its descriptor, or None if
    another `crucible up` holds it."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(settings.data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def is_held(settings: Settings) -> bool:
    """Whether a `crucible up` holds this folder's lock now."""
    try:
        fd = os.open(settings.data_dir / LOCK_FILE, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def record(settings: Settings, stack: RunningStack) -> None:
    """Write the stack file (0600: a Redis URL may hold a password), replacing it atomically."""
    path = stack_file(settings)
    temporary = path.with_suffix(".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    os.fchmod(fd, 0o600)  # also if the file was there before
    with os.fdopen(fd, "w") as out:
        out.write(json.dumps(asdict(stack), indent=2) + "\n")
    temporary.replace(path)


def forget(settings: Settings) -> None:
    """Remove the stack file (called by the `up` that holds the lock, so the file is its own)."""
    stack_file(settings).unlink(missing_ok=True)


def find(settings: Settings) -> RunningStack | None:
    """The stack recorded in this data folder, if its `crucible up` still runs."""
    recorded = _read(stack_file(settings))
    return recorded if recorded is not None and is_held(settings) else None


def admin_redis(settings: Settings) -> tuple[str, str]:
    """The Redis URL and key namespace an admin command works on: REDIS_URL's if set, else
    those of the stack running from this folder; else NoRunningStack, saying what to do."""
    if settings.redis_url or settings.redis_sentinels:
        return settings.redis_url_or_default, settings.namespace
    stack = find(settings)
    if stack is not None:
        return stack.redis_url, stack.namespace
    path = stack_file(settings)
    if is_held(settings):
        raise NoRunningStack("a `crucible up` is starting in this folder: try again after its banner")
    what = (
        f"the `crucible up` recorded in {path} is no longer running"
        if path.exists()
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


def _read(path: Path) -> RunningStack | None:
    try:
        return RunningStack(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None
