"""The sandbox uids an executor runs its slots as, held for this host by one live executor.

Two executors on one range would run strangers' code under the same uids (their per-uid
limits shared, and each one's host checks seeing the other's runs). So each uid has a lock
file in `LOCK_DIR`, held (flock) for the executor process's life and released by the kernel
however it ends, even by SIGKILL. An executor whose range is held by another refuses to start,
naming the other's pid and the setting that moves it; one that takes its range kills whatever
still runs under those uids: sandboxes left by an executor of that range that died.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
from collections.abc import Iterable
from pathlib import Path

from infra.settings import ConfigError

#: Shared by every process on the host whatever its TMPDIR (/run/lock is the host's lock folder).
LOCK_DIR = Path("/run/lock") if os.access("/run/lock", os.W_OK) else Path("/tmp")

#: uid -> the open lock file this process holds for it
_held: dict[int, int] = {}


def lock_path(uid: int) -> Path:
    return LOCK_DIR / f"crucible-sandbox-uid-{uid}.lock"


def claim(uids: Iterable[int]) -> None:
    """Hold every uid of `uids` for this process (uids it holds already are kept), or take
    none and raise `ConfigError` saying who holds them."""
    wanted = sorted(set(uids))
    taken: list[int] = []
    for uid in wanted:
        if uid in _held:
            continue
        fd = os.open(lock_path(uid), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            release(taken)
            raise ConfigError(
                f"sandbox uids {wanted[0]}-{wanted[-1]} are in use by another executor on this host "
                f"(pid {holder}): give each executor its own range with SANDBOX_UID_BASE"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        _held[uid] = fd
        taken.append(uid)


def release(uids: Iterable[int]) -> None:
    """Let go of uids this process holds (an in-process sandbox that closed)."""
    for uid in uids:
        fd = _held.pop(uid, None)
        if fd is not None:
            os.close(fd)  # closing the file releases its flock


def is_free(uids: Iterable[int]) -> bool:
    """Whether no process holds any of `uids` (a probe: it may be taken right after)."""
    for uid in uids:
        if uid in _held:
            return False
        path = lock_path(uid)
        if not path.exists():
            continue
        with open(path, "rb") as probe:
            try:
                fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            fcntl.flock(probe, fcntl.LOCK_UN)
    return True


def sweep(uids: Iterable[int]) -> int:
    """Kill every process running as one of `uids` (held by this process, so none is a live
    executor's); returns how many were killed."""
    wanted = {str(uid) for uid in uids}
    killed = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, StopIteration):
            status = (entry / "status").read_text()
            real_uid = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1]
            if real_uid in wanted:
                os.kill(int(entry.name), signal.SIGKILL)
                killed += 1
    return killed
