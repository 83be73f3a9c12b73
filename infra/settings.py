"""All configuration, read from environment variables in one place.

Every knob the service has is a field of `Settings`; docs/configuration.md
documents the same names. Nothing else in the code reads `os.environ` for settings.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from evaluations.celery_wire import LEGACY_QUEUES
from evaluations.queue import LEVEL_ALIASES, LEVELS
from evaluations.retry_policies import Policies, with_overrides
from evaluations.submission_spec import Bounds
from evaluations.validation import bool_word


class ConfigError(ValueError):
    """A setting has a value the service cannot use."""


def _int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, got {raw!r}") from None


def _at_least_one(name: str, default: int) -> int:
    value = _int(name, default)
    if value < 1:
        raise ConfigError(f"{name} must be 1 or more, got {value}")
    return value


def _share(name: str, default: float, alias: str | None = None) -> float:
    raw = os.environ.get(name) or (os.environ.get(alias) if alias else None)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number between 0.0 and 1.0, got {raw!r}") from None
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{name} must be between 0.0 and 1.0, got {raw!r}")
    return value


def _seconds(name: str, default: float) -> float:
    """A duration in seconds, more than 0 (fractions allowed)."""
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number of seconds, got {raw!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{name} must be more than 0 seconds, got {raw!r}")
    return value


#: Files one submission may bring: each is a descriptor handed to a fork server (it takes 64).
MAX_FILES = 48


def _at_most(name: str, default: int, most: int) -> int:
    value = _int(name, default)
    if not 0 <= value <= most:
        raise ConfigError(f"{name} must be between 0 and {most}, got {value}")
    return value


def _retry_policies(raw: str | None) -> Policies:
    try:
        return with_overrides(raw)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _redis_url(name: str) -> str | None:
    raw = (os.environ.get(name) or "").strip()
    if raw and not raw.startswith(("redis://", "rediss://", "unix://")):
        given = f"a {raw.split('://', 1)[0]}:// URL" if "://" in raw else "no URL scheme"
        raise ConfigError(f"{name} must be a Redis URL (redis://, rediss:// or unix://), got {given}")
    return raw or None


def _sentinels(name: str) -> tuple[tuple[str, int], ...]:
    """`host:port,host:port` (IPv6 in brackets: `[::1]:26379`)."""
    found = []
    for part in (os.environ.get(name) or "").split(","):
        part = part.strip()
        if not part:
            continue
        host, colon, port = part.rpartition(":")
        if not colon or not host or not port.isdigit():
            raise ConfigError(f"{name} must be host:port pairs separated by commas, got {part!r}")
        found.append((host.strip("[]"), int(port)))
    return tuple(found)


def _bool(name: str, default: bool) -> bool:
    raw = (os.environ.get(name) or "").strip().lower()
    if raw == "":
        return default
    value = bool_word(raw)
    if value is None:
        raise ConfigError(f"{name} must be true or false, got {raw!r}")
    return value


def _str(name: str, default: str) -> str:
    return os.environ.get(name) or default


def _choice(name: str, default: str, choices: tuple[str, ...]) -> str:
    value = _str(name, default)
    if value not in choices:
        raise ConfigError(f"{name} must be one of {choices}, got {value!r}")
    return value


def _levels(raw: str) -> tuple[str, ...]:
    """Turn `CELERY_QUEUES`-style names into our levels, kept in strict priority order."""
    names = [part.strip() for part in raw.split(",") if part.strip()]
    unknown = [n for n in names if n not in LEVEL_ALIASES]
    if unknown:
        raise ConfigError(f"unknown queue names {unknown}; known: {sorted(LEVEL_ALIASES)}")
    wanted = {LEVEL_ALIASES[n] for n in names}
    return tuple(level for level in LEVELS if level in wanted)


#: Per tier: submissions per second (refill), burst (bucket size), evaluations queued or running,
#: event streams (`/api/eval/{id}/events`) open at once, and reads (a record, a timeline, a
#: stream opened: one each; a list page: one per 50 rows) per second and their burst, and the
#: megabytes a key's finished evaluations may store (code, output, error) per clock hour, and
#: how many of its evaluations may run at once (0: no limit for either).
DEFAULT_RATE_LIMITS: dict[str, dict[str, float]] = {
    "standard": {"per_second": 2, "burst": 20, "max_active": 20, "max_streams": 10,
                 "reads_per_second": 20, "read_burst": 100, "stored_mb_per_hour": 200,
                 "max_running": 2},
    "premium": {"per_second": 10, "burst": 100, "max_active": 200, "max_streams": 50,
                "reads_per_second": 100, "read_burst": 500, "stored_mb_per_hour": 2000,
                "max_running": 8},
    "admin": {"per_second": 100, "burst": 1000, "max_active": 10000, "max_streams": 500,
              "reads_per_second": 1000, "read_burst": 5000, "stored_mb_per_hour": 0,
              "max_running": 0},
}  # fmt: skip


def _rate_limits(raw: str | None) -> dict[str, dict[str, float]]:
    """`CRUCIBLE_RATE_LIMITS` JSON merged over the defaults, e.g. {"standard": {"burst": 50}}."""
    limits = {tier: dict(values) for tier, values in DEFAULT_RATE_LIMITS.items()}
    if raw:
        try:
            given = json.loads(raw)
            for tier, values in given.items():
                limits[tier].update({k: float(v) for k, v in values.items() if k in limits[tier]})
        except (ValueError, KeyError, AttributeError, TypeError) as exc:
            raise ConfigError(f"CRUCIBLE_RATE_LIMITS is not valid: {exc}") from None
    return limits


@dataclass(frozen=True)
class Settings:
    """A snapshot of the environment; build one with `Settings.from_env()`."""

    redis_url: str | None
    namespace: str
    data_dir: Path
    log_level: str
    log_format: str
    #: whether `crucible up` shows its pieces' own logs on its output (`show`) or in files (`hide`)
    up_logs: str
    api_host: str
    api_port: int
    api_processes: int
    api_max_connections: int
    redis_maxmemory_mb: int
    redis_full_share: float
    #: past this share of maxmemory, finished evaluations are shed (infra/redis_memory.py)
    redis_shed_share: float
    #: finished evaluations younger than this are never shed (only their outputs trimmed)
    min_retention_s: float
    #: outputs (and errors) longer than this are trimmed when shedding
    shed_output_bytes: int
    #: Sentinels that name Crucible's Redis (empty: `REDIS_URL` names it), the master's name there
    redis_sentinels: tuple[tuple[str, int], ...]
    redis_sentinel_master: str
    redis_sentinel_password: str | None
    #: the Redis password when `REDIS_URL` carries none
    redis_password: str | None
    #: replicas that must have a submission (and a result) before it is answered (WAIT; 0: off)
    redis_min_replicas: int
    redis_wait_ms: int
    header_timeout_s: float
    body_timeout_s: float
    #: the longest `POST /api/eval?wait=true` may wait for a result (`wait_timeout`'s maximum)
    max_wait_s: float
    dashboard_host: str
    dashboard_port: int
    executor_host: str
    executor_port: int
    executor_urls: tuple[str, ...]
    storage_url: str | None
    worker_processes: int
    worker_threads: int
    worker_levels: tuple[str, ...]
    heartbeat_interval_ms: int
    heartbeat_timeout_ms: int
    retention_seconds: int
    max_code_bytes: int
    default_timeout: float
    max_timeout: float
    memory_limit_mb: int
    output_limit_bytes: int
    executor_concurrency: int
    sandbox_tmpfs_mb: int
    sandbox_max_processes: int
    sandbox_max_open_files: int
    sandbox_file_size_mb: int
    sandbox_uid_base: int
    sandbox_read_mb_per_s: int
    sandbox_read_ops_per_s: int
    python_path: str
    sandbox_cgroups: str
    sandbox_fork_server: bool
    sandbox_fork_server_runs: int
    sandbox_compile_cache_mb: int
    max_stdin_bytes: int
    max_cases: int
    max_files: int
    max_files_bytes: int
    max_submission_wall_s: float
    #: the built-in retry policies (`evaluations.retry_policies`) with `CRUCIBLE_RETRY_POLICIES` merged in
    retry_policies: Policies
    admin_key: str | None
    metrics_token: str | None
    executor_secret: str | None
    rate_limits: dict[str, dict[str, float]]
    cleanup_cron: str
    dlq_monitor_cron: str
    dlq_warning_threshold: int
    dlq_retention_days: int
    tick_skip_after_s: int
    legacy_broker_url: str | None
    celery_wire_queues: tuple[str, ...]
    #: where unchanged Celery producers read their results (None: Crucible's own Redis)
    celery_result_backend: str | None
    #: webhook hosts reached although their addresses are not global (infra/outbound.py)
    webhook_allow_hosts: tuple[str, ...]
    #: how long one webhook delivery may take, all of it
    webhook_timeout_s: float
    #: how many of one key's webhook deliveries may be attempted at once
    webhook_max_in_flight: int
    legacy_backend_url: str | None
    legacy_key_prefix: str
    dramatiq_share: float
    force_legacy: bool
    shadow_rate: float

    @classmethod
    def from_env(cls) -> Settings:
        executors = _str("EXECUTOR_SERVICE_URL", "http://127.0.0.1:8083")
        return cls(
            redis_url=os.environ.get("REDIS_URL") or os.environ.get("CELERY_BROKER_URL") or None,
            namespace=_str("CRUCIBLE_NAMESPACE", "crucible"),
            data_dir=Path(_str("CRUCIBLE_DATA_DIR", "data")).resolve(),
            log_level=_str("LOG_LEVEL", "INFO").upper(),
            log_format=_choice("LOG_FORMAT", "auto", ("auto", "console", "json")),
            up_logs=_choice("CRUCIBLE_UP_LOGS", "hide", ("hide", "show")),
            api_host=_str("CRUCIBLE_API_HOST", "127.0.0.1"),
            api_port=_int("CRUCIBLE_API_PORT", 8080),
            api_processes=_at_least_one("CRUCIBLE_API_PROCESSES", 1),
            api_max_connections=_at_least_one("CRUCIBLE_API_MAX_CONNECTIONS", 2000),
            redis_maxmemory_mb=_int("CRUCIBLE_REDIS_MAXMEMORY_MB", 4096),
            redis_full_share=_share("CRUCIBLE_REDIS_FULL_SHARE", 0.9),
            redis_shed_share=_share("CRUCIBLE_REDIS_SHED_SHARE", 0.8),
            min_retention_s=_seconds("CRUCIBLE_MIN_RETENTION_S", 3600.0),
            shed_output_bytes=_int("CRUCIBLE_SHED_OUTPUT_BYTES", 4096),
            redis_sentinels=_sentinels("REDIS_SENTINELS"),
            redis_sentinel_master=_str("REDIS_SENTINEL_MASTER", "crucible"),
            redis_sentinel_password=os.environ.get("REDIS_SENTINEL_PASSWORD") or None,
            redis_password=os.environ.get("REDIS_PASSWORD") or None,
            redis_min_replicas=_at_most("CRUCIBLE_REDIS_MIN_REPLICAS", 0, 16),
            redis_wait_ms=_at_least_one("CRUCIBLE_REDIS_WAIT_MS", 500),
            header_timeout_s=float(_at_least_one("CRUCIBLE_HEADER_TIMEOUT_S", 10)),
            body_timeout_s=float(_at_least_one("CRUCIBLE_BODY_TIMEOUT_S", 30)),
            max_wait_s=_seconds("CRUCIBLE_MAX_WAIT_S", 30.0),
            dashboard_host=_str("DASHBOARD_HOST", "127.0.0.1"),
            dashboard_port=_int("DASHBOARD_PORT", 5555),
            executor_host=_str("EXECUTOR_HOST", "127.0.0.1"),
            executor_port=_int("EXECUTOR_PORT", 8083),
            executor_urls=tuple(u.strip().rstrip("/") for u in executors.split(",") if u.strip()),
            storage_url=(os.environ.get("STORAGE_SERVICE_URL") or "").rstrip("/") or None,
            worker_processes=_int("CELERY_CONCURRENCY", 2),
            worker_threads=_int("CRUCIBLE_WORKER_THREADS", 4),
            worker_levels=_levels(os.environ.get("CELERY_QUEUES") or "high,default,low"),
            heartbeat_interval_ms=_int("CRUCIBLE_HEARTBEAT_INTERVAL_MS", 1000),
            heartbeat_timeout_ms=_int("CRUCIBLE_HEARTBEAT_TIMEOUT_MS", 10000),
            retention_seconds=_int("CRUCIBLE_RETENTION_HOURS", 24) * 3600,
            max_code_bytes=_int("CRUCIBLE_MAX_CODE_BYTES", 64 * 1024),
            default_timeout=float(_int("CRUCIBLE_DEFAULT_TIMEOUT", 30)),
            max_timeout=float(_int("CRUCIBLE_MAX_TIMEOUT", 60)),
            memory_limit_mb=_int("SANDBOX_MEMORY_MB", 512),
            output_limit_bytes=_int("SANDBOX_OUTPUT_LIMIT_BYTES", 64 * 1024),
            executor_concurrency=_int("EXECUTOR_CONCURRENCY", 8),
            sandbox_tmpfs_mb=_int("SANDBOX_TMPFS_MB", 100),
            sandbox_max_processes=_int("SANDBOX_MAX_PROCESSES", 64),
            sandbox_max_open_files=_int("SANDBOX_MAX_OPEN_FILES", 64),
            sandbox_file_size_mb=_int("SANDBOX_FILE_SIZE_MB", 16),
            sandbox_uid_base=_int("SANDBOX_UID_BASE", 60000),
            sandbox_read_mb_per_s=_int("SANDBOX_READ_MB_PER_S", 32),
            sandbox_read_ops_per_s=_int("SANDBOX_READ_OPS_PER_S", 1000),
            python_path=_str("SANDBOX_PYTHON", "/usr/bin/python3"),
            sandbox_fork_server=_bool("SANDBOX_FORK_SERVER", True),
            sandbox_fork_server_runs=_at_least_one("SANDBOX_FORK_SERVER_RUNS", 500),
            sandbox_compile_cache_mb=_int("SANDBOX_COMPILE_CACHE_MB", 64),
            sandbox_cgroups=_choice("SANDBOX_CGROUPS", "auto", ("auto", "off", "required")),
            max_stdin_bytes=_int("CRUCIBLE_MAX_STDIN_BYTES", 1024 * 1024),
            max_cases=_at_least_one("CRUCIBLE_MAX_CASES", 100),
            max_files=_at_most("CRUCIBLE_MAX_FILES", 32, MAX_FILES),
            max_files_bytes=_int("CRUCIBLE_MAX_FILES_BYTES", 1024 * 1024),
            max_submission_wall_s=float(_at_least_one("CRUCIBLE_MAX_SUBMISSION_WALL_S", 600)),
            retry_policies=_retry_policies(os.environ.get("CRUCIBLE_RETRY_POLICIES")),
            admin_key=os.environ.get("CRUCIBLE_ADMIN_KEY") or None,
            metrics_token=os.environ.get("CRUCIBLE_METRICS_TOKEN") or None,
            executor_secret=os.environ.get("EXECUTOR_SECRET") or None,
            rate_limits=_rate_limits(os.environ.get("CRUCIBLE_RATE_LIMITS")),
            cleanup_cron=_str("CRUCIBLE_CLEANUP_CRON", "0 * * * *"),
            dlq_monitor_cron=_str("CRUCIBLE_DLQ_MONITOR_CRON", "*/15 * * * *"),
            dlq_warning_threshold=_int("CRUCIBLE_DLQ_WARNING_THRESHOLD", 100),
            dlq_retention_days=_int("CRUCIBLE_DLQ_RETENTION_DAYS", 30),
            tick_skip_after_s=_int("CRUCIBLE_TICK_SKIP_AFTER_S", 3600),
            legacy_broker_url=os.environ.get("LEGACY_BROKER_URL") or None,
            celery_wire_queues=tuple(
                q.strip() for q in _str("CELERY_WIRE_QUEUES", ",".join(LEGACY_QUEUES)).split(",") if q.strip()
            ),
            celery_result_backend=_redis_url("CELERY_RESULT_BACKEND"),
            webhook_allow_hosts=tuple(
                h.strip().lower() for h in _str("CRUCIBLE_WEBHOOK_ALLOW_HOSTS", "").split(",") if h.strip()
            ),
            webhook_timeout_s=float(_at_least_one("CRUCIBLE_WEBHOOK_TIMEOUT_S", 5)),
            webhook_max_in_flight=_at_least_one("CRUCIBLE_WEBHOOK_MAX_IN_FLIGHT", 2),
            legacy_backend_url=os.environ.get("LEGACY_RESULT_BACKEND") or os.environ.get("LEGACY_BROKER_URL"),
            legacy_key_prefix=_str("LEGACY_KEY_PREFIX", ""),
            dramatiq_share=_share("DRAMATIQ_PERCENTAGE", 1.0, alias="CELERY_PERCENTAGE"),
            force_legacy=_bool("FORCE_LEGACY_QUEUE", False),
            shadow_rate=_share("MIGRATION_SHADOW_RATE", 0.0),
        )

    @property
    def submission_bounds(self) -> Bounds:
        """What a run may ask for here: the same at every door and at the executors."""
        return Bounds(
            max_code_bytes=self.max_code_bytes,
            max_stdin_bytes=self.max_stdin_bytes,
            default_timeout=self.default_timeout,
            max_timeout=self.max_timeout,
            max_memory_mb=self.memory_limit_mb,
            max_output_bytes=self.output_limit_bytes,
            max_files=self.max_files,
            max_files_bytes=self.max_files_bytes,
            max_cases=self.max_cases,
            max_total_wall_s=self.max_submission_wall_s,
        )

    @property
    def redis_url_or_default(self) -> str:
        """Standalone pieces without `REDIS_URL` talk to a Redis on this machine."""
        return self.redis_url or "redis://127.0.0.1:6379/0"


@cache
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return Settings.from_env()
