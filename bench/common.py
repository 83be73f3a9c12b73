"""What every benchmark scenario shares: a Redis, stack processes, progress, tables and JSON.

Each scenario starts what it measures itself (embedded Valkey unless REDIS_URL is set), in its
own key namespace, and stops it afterwards, so one command reproduces its figures anywhere.
"""

from __future__ import annotations

import json
import secrets
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script or `-m bench`: `bench.*` imports

from bench.stack import delete_namespace, free_port, process, redis_server, spawn, wait_http  # noqa: E402
from evaluations.redis_keys import RedisKeys  # noqa: E402

HELLO = "print('hello world')"
#: Quotas out of the way: a benchmark measures the path, and still pays for the quota check.
UNLIMITED = json.dumps({"admin": {"per_second": 1e9, "burst": 1e9, "max_active": 1e9}})

__all__ = ["delete_namespace", "free_port", "redis_server", "spawn", "wait_http"]


@dataclass
class Stack:
    """A running Crucible: API, workers and executors on one Redis, in their own namespace."""

    url: str
    namespace: str
    api: str
    admin_key: str
    secret: str
    executors: list[str] = field(default_factory=list)
    worker_env: dict[str, str] = field(default_factory=dict)
    #: top process of each role (api, workers, executor: the first one), for `bench.cpu`
    pids: dict[str, int] = field(default_factory=dict)

    def workers(self, processes: int, threads: int) -> AbstractContextManager[object]:
        """Start a `crucible worker` now (for a backlog queued before any worker consumes)."""
        env = {
            **self.worker_env,
            "CELERY_CONCURRENCY": str(processes),
            "CRUCIBLE_WORKER_THREADS": str(threads),
        }
        return process("bench-worker-late", "worker", env)

    def client(self, **options: object) -> httpx.AsyncClient:
        headers = {"authorization": f"Bearer {self.admin_key}"}
        return httpx.AsyncClient(base_url=self.api, headers=headers, timeout=120, **options)  # type: ignore[arg-type]


@contextmanager
def stack(
    url: str,
    *,
    workers: int = 2,
    threads: int = 4,
    executors: int = 1,
    api: bool = True,
    env: dict[str, str] | None = None,
) -> Iterator[Stack]:
    """Start `executors` executors, one `crucible worker` with `workers` processes, and the API."""
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    secret = secrets.token_urlsafe(16)
    admin_key = secrets.token_urlsafe(24)
    base = {
        "REDIS_URL": url,
        "CRUCIBLE_NAMESPACE": namespace,
        "EXECUTOR_SECRET": secret,
        "CRUCIBLE_ADMIN_KEY": admin_key,
        "CRUCIBLE_RATE_LIMITS": UNLIMITED,
        "LOG_LEVEL": "WARNING",
        "LOG_FORMAT": "json",
        **(env or {}),
    }
    with ExitStack() as running:
        urls: list[str] = []
        pids: dict[str, int] = {}
        for n in range(executors):
            port = free_port()
            # each executor gets sandbox uids no other on this host holds (bench/stack.py)
            env_n = {**base, "EXECUTOR_PORT": str(port)}
            pids.setdefault(
                "executor", running.enter_context(process(f"bench-executor-{n}", "executor", env_n)).pid
            )
            urls.append(f"http://127.0.0.1:{port}")
        for executor in urls:
            wait_http(f"{executor}/health")
        worker_env = {**base, "EXECUTOR_SERVICE_URL": ",".join(urls), "CELERY_CONCURRENCY": str(workers),
                      "CRUCIBLE_WORKER_THREADS": str(threads)}  # fmt: skip
        if workers:
            pids["workers"] = running.enter_context(process("bench-worker", "worker", worker_env)).pid
        api_url = ""
        if api:
            port = free_port()
            api_env = {**worker_env, "CRUCIBLE_API_PORT": str(port)}
            pids["api"] = running.enter_context(process("bench-api", "api", api_env)).pid
            api_url = f"http://127.0.0.1:{port}"
            wait_http(f"{api_url}/health")
        try:
            pids["valkey"] = redis_pid(url)
            yield Stack(url, namespace, api_url, admin_key, secret, urls, worker_env, pids)
        finally:
            running.close()
            delete_namespace(url, namespace)


def redis_pid(url: str) -> int:
    """The Redis (Valkey) server's pid, as it reports it (this host's, for a local one)."""
    client = redis.Redis.from_url(url)
    try:
        return int(client.info("server")["process_id"])
    finally:
        client.close()


def wait_workers(url: str, namespace: str, processes: int, timeout: float = 60) -> None:
    """Until `processes` worker processes have published themselves (they are consuming)."""
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + timeout
    while client.zcard(RedisKeys(namespace).workers) < processes:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{processes} worker processes did not start within {timeout}s")
        time.sleep(0.1)
    client.close()


def progress(total: int, label: str, unit: str = "task") -> tqdm:
    """A bar on stderr to `update()` by hand."""
    return tqdm(total=total, desc=label, unit=unit, file=sys.stderr, leave=False)


def steps(total: int, label: str, unit: str = "run") -> tqdm:
    """`range(total)` with a bar on stderr."""
    return tqdm(range(total), desc=label, unit=unit, file=sys.stderr, leave=False)


def poll_until(count: Callable[[], int], total: int, label: str, timeout: float = 600) -> None:
    """Show `count()` rising to `total` (polled, synchronously); raise if it takes too long."""
    deadline = time.monotonic() + timeout
    with progress(total, label) as bar:
        while (done := count()) < total:
            bar.update(done - bar.n)
            if time.monotonic() > deadline:
                raise TimeoutError(f"{label}: {done}/{total} after {timeout}s")
            time.sleep(0.02)
        bar.update(total - bar.n)


def percentiles(values_ms: Sequence[float]) -> dict[str, float]:
    """p50/p95/p99 (and mean) of a sample in milliseconds."""
    if not values_ms:
        return {"p50": float("nan"), "p95": float("nan"), "p99": float("nan"), "mean": float("nan")}
    if len(values_ms) == 1:
        only = float(values_ms[0])
        return {"p50": only, "p95": only, "p99": only, "mean": only}
    cuts = statistics.quantiles(values_ms, n=100, method="inclusive")
    return {"p50": cuts[49], "p95": cuts[94], "p99": cuts[98], "mean": statistics.fmean(values_ms)}


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A plain table: numbers right-aligned, floats with one decimal."""

    def cell(value: object) -> str:
        return f"{value:.1f}" if isinstance(value, float) else str(value)

    cells = [[cell(v) for v in row] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]

    def line(values: Sequence[str]) -> str:
        first, *rest = values
        right = (v.rjust(w) for v, w in zip(rest, widths[1:], strict=True))
        return "  ".join([first.ljust(widths[0]), *right])

    print(f"\n{title}")
    print(line(columns))
    for row in cells:
        print(line(row))


def write_json(path: Path | None, scenario: str, figures: dict[str, object]) -> None:
    if path:
        path.write_text(json.dumps({"scenario": scenario, **figures}, indent=2))


def ratio(value: float, base: float | None) -> str:
    return f"{value / base:.2f}x" if base else "-"
