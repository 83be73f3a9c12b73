"""`crucible submit`: send files as evaluations through the HTTP API and wait for them all.

A progress bar follows the evaluations to their final status; what the API refused is listed
once the bar is done, then a table (or JSON) of the results. Files go in as one batch request
per 100 (low queue) with `--batch`, else one request each (default queue, or high with
`--priority`). Run from the folder of a `crucible up`, it finds that stack's API and admin key.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from app.cli import running_stack
from app.cli.tables import aligned
from evaluations.languages import EXTENSIONS
from evaluations.status import TERMINAL
from infra.settings import ConfigError, get_settings

BATCH = 100
POLL_S = 0.3


class SubmitError(Exception):
    """Nothing can be submitted (no API, a refused key): one line, not a traceback."""


@dataclass(frozen=True)
class Target:
    """The API to send to and the key to send, with where each came from (for error lines)."""

    api: str
    api_key: str | None
    key_source: str


def target(args: argparse.Namespace) -> Target:
    """`--api`, else the API of the stack running from this folder, else CRUCIBLE_API_PORT's;
    `--api-key`, else CRUCIBLE_API_KEY, else that folder's admin key (`data/admin.key`)."""
    settings = get_settings()
    stack = running_stack.find(settings)
    api = args.api or (stack.api_url if stack else f"http://127.0.0.1:{settings.api_port}")
    if args.api_key:
        return Target(api, args.api_key, "--api-key")
    if key := os.environ.get("CRUCIBLE_API_KEY"):
        return Target(api, key, "CRUCIBLE_API_KEY")
    admin_key = settings.data_dir / "admin.key"
    if admin_key.is_file():
        return Target(api, admin_key.read_text().strip(), str(admin_key))
    return Target(api, None, "")


def language_of(path: Path, given: str | None) -> str:
    if given:
        return given
    if language := EXTENSIONS.get(path.suffix.lower()):
        return language
    known = " ".join(sorted(EXTENSIONS))
    raise ConfigError(f"cannot tell the language of {path} from its extension ({known}); give --language")


def read_bodies(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every file's request, or ConfigError naming the first file that cannot be sent."""
    bodies = []
    for path in args.files:
        try:
            code = path.read_text()
        except FileNotFoundError:
            raise ConfigError(f"no such file: {path}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read {path}: {exc}") from None
        body = {"code": code, "language": language_of(path, args.language)}
        if args.timeout is not None:  # else the service's default
            body["timeout"] = args.timeout
        bodies.append(body)
    return bodies


def refusal(answer: httpx.Response, where: Target) -> str:
    """Why the API refused a request, in its own words."""
    try:
        body = answer.json()
        reason = body.get("error") or body.get("detail") or answer.text
    except ValueError:
        reason = answer.text
    line = f"refused ({answer.status_code}): {str(reason)[:200]}"
    if answer.status_code == 401:
        if where.api_key is None:
            raise SubmitError(f"{line}; no key was found: give --api-key, set CRUCIBLE_API_KEY, or run "
                              "from the folder of `./dev up` (its data/admin.key)")  # fmt: skip
        raise SubmitError(f"{line}; the key came from {where.key_source}")
    return line


async def submit_all(
    api: httpx.AsyncClient, args: argparse.Namespace, bodies: list[dict[str, Any]], where: Target
) -> tuple[dict[str, Path], list[str]]:
    """Submit every file; returns eval_id -> file, and a line for each file the API refused."""
    ids: dict[str, Path] = {}
    refused: list[str] = []
    if args.batch:
        for start in range(0, len(bodies), BATCH):
            answer = await api.post("/api/eval-batch", json={"evaluations": bodies[start : start + BATCH]})
            if answer.status_code != 200:
                refused += [f"{path}: {refusal(answer, where)}" for path in args.files[start : start + BATCH]]
                continue
            for index, item in enumerate(answer.json()["evaluations"]):
                path = args.files[start + index]
                if item["status"] == "queued":
                    ids[item["eval_id"]] = path
                else:
                    refused.append(f"{path}: refused: {item['error']}")
        return ids, refused
    for path, body in zip(args.files, bodies, strict=True):
        answer = await api.post("/api/eval", json={**body, "priority": args.priority})
        if answer.status_code != 200:
            refused.append(f"{path}: {refusal(answer, where)}")
            continue
        ids[answer.json()["eval_id"]] = path
    return ids, refused


async def wait_all(api: httpx.AsyncClient, ids: list[str], wait_s: float) -> dict[str, dict[str, Any]]:
    """Poll until every evaluation is final (or `wait_s` passed), with a progress bar on stderr."""
    results: dict[str, dict[str, Any]] = {}
    gate = asyncio.Semaphore(16)

    async def look(eval_id: str) -> None:
        async with gate:
            answer = await api.get(f"/api/eval/{eval_id}")
        if answer.status_code == 404:  # removed meanwhile (retention): nothing more to wait for
            results[eval_id] = {"eval_id": eval_id, "status": "missing"}
        elif answer.status_code == 200 and answer.json().get("status") in TERMINAL:
            results[eval_id] = answer.json()

    deadline = time.monotonic() + wait_s
    with tqdm(total=len(ids), unit="eval", desc="evaluations", file=sys.stderr) as bar:
        while len(results) < len(ids):
            if time.monotonic() > deadline:
                for eval_id in ids:
                    results.setdefault(eval_id, {"eval_id": eval_id, "status": "not finished"})
                break
            before = len(results)
            await asyncio.gather(*(look(i) for i in ids if i not in results))
            bar.update(len(results) - before)
            if len(results) < len(ids):
                await asyncio.sleep(POLL_S)
    return results


def said(result: dict[str, Any]) -> str:
    """What a row shows of a result: a completed run's first line of output; else the last
    line of its error (a traceback's last line names the exception), else of its output."""
    if result["status"] == "completed":
        lines = (result.get("output") or "").strip().splitlines()
        return lines[0] if lines else ""
    lines = (result.get("error") or result.get("output") or "").strip().splitlines()
    return lines[-1] if lines else ""


def result_table(ids: dict[str, Path], results: dict[str, dict[str, Any]]) -> str:
    """One row per file: its evaluation, final status, exit code, wall time and what it said."""
    rows = [("file", "eval_id", "status", "exit", "ms", "output (first line) / error (last line)")]
    for eval_id, path in ids.items():
        r = results[eval_id]
        runtime, code = r.get("runtime_ms"), r.get("exit_code")
        rows.append((str(path), eval_id, r["status"], "-" if code is None else str(code),
                     "-" if runtime is None else f"{runtime:g}", said(r)[:80]))  # fmt: skip
    return aligned(rows)


async def send_and_wait(args: argparse.Namespace, where: Target, bodies: list[dict[str, Any]]) -> int:
    headers = {"x-api-key": where.api_key} if where.api_key else {}
    # straight to a local API, never through a proxy the environment names
    local = httpx.URL(where.api).host in ("127.0.0.1", "localhost", "::1")
    async with httpx.AsyncClient(base_url=where.api, timeout=60, headers=headers, trust_env=not local) as api:
        ids, refused = await submit_all(api, args, bodies, where)
        results = await wait_all(api, list(ids), args.wait) if ids else {}
    for line in refused:  # after the bar, before the results: nothing interleaved
        print(line, file=sys.stderr)
    if args.json:
        print(json.dumps([{"file": str(ids[i]), **results[i]} for i in ids], indent=2))
    elif ids:
        print(result_table(ids, results))
    return 0 if ids and not refused and all(r["status"] == "completed" for r in results.values()) else 1


async def run(args: argparse.Namespace) -> int:
    """Read every file first (a missing one stops everything), then send and wait."""
    bodies = read_bodies(args)
    where = target(args)
    try:
        return await send_and_wait(args, where, bodies)
    except httpx.TransportError as exc:
        raise SubmitError(
            f"cannot reach the API at {where.api} ({exc or type(exc).__name__}); start the stack with "
            "`./dev up`, or give --api"
        ) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", type=Path, help="source files, one evaluation each")
    parser.add_argument(
        "--api", default=None, help="the API's base URL (default: the stack `crucible up` runs from this "
        "folder, else http://127.0.0.1:$CRUCIBLE_API_PORT)",
    )  # fmt: skip
    parser.add_argument(
        "--api-key", default=None,
        help="API key (default: $CRUCIBLE_API_KEY, else this folder's data/admin.key)",
    )  # fmt: skip
    parser.add_argument(
        "--language", default=None, choices=sorted(set(EXTENSIONS.values())),
        help="the files' language (default: from each file's extension)",
    )  # fmt: skip
    parser.add_argument(
        "--timeout", type=float, default=None,
        help="CPU seconds each run may use (default: the service's, CRUCIBLE_DEFAULT_TIMEOUT: 30)",
    )  # fmt: skip
    queue = parser.add_mutually_exclusive_group()
    queue.add_argument("--batch", action="store_true", help="send as batches (low queue; default: one each)")
    queue.add_argument("--priority", action="store_true", help="high queue (default: the default queue)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON (default: a table)")
    parser.add_argument(
        "--wait", type=float, default=3600,
        help="give up waiting after this many seconds (default: %(default)s)",
    )  # fmt: skip
