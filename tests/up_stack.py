"""The real `crucible` command, as a new user runs it: `crucible up` started in a folder of its
own (its data in `./data` there), and `crucible <command>` run from that folder.

Only what a user sets is given: the three ports (so a stack already on this host does not
collide), a free sandbox uid range, and a small worker pool. Nothing points the pieces at each
other, no Redis URL, admin key or secret: `crucible up` must do that itself.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.stack import free_port, free_uid_base

#: The installed `crucible` command of this interpreter's environment.
CRUCIBLE = str(Path(sys.executable).parent / "crucible")
#: What the test session sets for the pieces it starts itself, and a user would not have (nor
#: the shell's choice of where `up` shows logs: the tests ask for it when they mean it).
NOT_A_USERS = ("REDIS_URL", "CELERY_BROKER_URL", "CRUCIBLE_ADMIN_KEY", "EXECUTOR_SECRET", "CRUCIBLE_API_KEY",
               "EXECUTOR_SERVICE_URL", "CRUCIBLE_DATA_DIR", "CRUCIBLE_NAMESPACE",
               "CRUCIBLE_UP_LOGS")  # fmt: skip
#: `crucible up`'s line for a piece that answers: its mark, its name, where it answers.
READY_LINE = re.compile(r"^  ✓ (\S+) +\S")
#: The pieces a default `crucible up` starts, as its ready lines name them.
PIECES = {"valkey", "executor", "API", "workers", "scheduler", "dashboard", "celery-ingress"}


def user_env(**extra: str) -> dict[str, str]:
    """The test's environment without what only the test session sets."""
    env = {k: v for k, v in os.environ.items() if k not in NOT_A_USERS}
    return {**env, "LOG_FORMAT": "json", **extra}


@dataclass
class UpStack:
    """One `crucible up` running in `folder`."""

    folder: Path
    api_port: int = field(default_factory=free_port)
    dashboard_port: int = field(default_factory=free_port)
    executor_port: int = field(default_factory=free_port)
    uid_base: int = field(default_factory=free_uid_base)
    process: subprocess.Popen[bytes] | None = None
    #: where the latest start's output begins in the log
    log_from: int = 0

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def log(self) -> Path:
        return self.folder / "up.log"

    @property
    def logs(self) -> Path:
        """Where `crucible up` puts its pieces' own logs (unless CRUCIBLE_UP_LOGS=show)."""
        return self.folder / "data" / "logs"

    def env(self, **extra: str) -> dict[str, str]:
        return user_env(
            CRUCIBLE_API_PORT=str(self.api_port), DASHBOARD_PORT=str(self.dashboard_port),
            EXECUTOR_PORT=str(self.executor_port), SANDBOX_UID_BASE=str(self.uid_base),
            CELERY_CONCURRENCY="1", CRUCIBLE_WORKER_THREADS="2", **extra,
        )  # fmt: skip

    def start(self, *options: str, **extra: str) -> subprocess.Popen[bytes]:
        """`crucible up <options>` with the environment `extra` adds."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self.log_from = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [CRUCIBLE, "up", *options], env=self.env(**extra), cwd=self.folder, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,  # a stop that times out kills the group
            )  # fmt: skip
        return self.process

    def output(self) -> str:
        """What the latest start printed so far."""
        return self.log.read_bytes()[self.log_from :].decode(errors="replace")

    def wait_banner(self, seconds: float = 120) -> str:
        """The latest start's output once `Crucible is up` is in it (AssertionError if `up`
        exits first or takes too long)."""
        deadline = time.monotonic() + seconds
        while "Crucible is up" not in (text := self.output()):
            assert self.process is not None and self.process.poll() is None, f"crucible up exited:\n{text}"
            assert time.monotonic() < deadline, f"no banner after {seconds}s:\n{text}"
            time.sleep(0.1)
        return text

    def before_banner(self) -> list[str]:
        """The latest start's lines before its banner."""
        return self.output().split("Crucible is up", 1)[0].strip("\n").splitlines()

    def crucible(self, *argv: str, timeout: float = 120, **extra: str) -> subprocess.CompletedProcess[str]:
        """`crucible <argv>` run from this stack's folder, as its user would."""
        return subprocess.run(
            [CRUCIBLE, *argv], env=user_env(**extra), cwd=self.folder, capture_output=True, text=True,
            timeout=timeout,
        )  # fmt: skip
