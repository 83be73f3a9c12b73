"""`crucible submit`: send files as evaluations through the HTTP API and wait for them all.

A progress bar follows the evaluations to their final status; a table (or JSON) of the
results follows. Files go in as one batch request per 100 (low queue) with `--batch`, else
one request each (default queue, or high with `--priority`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from evaluations.status import TERMINAL

BATCH = 100
POLL_S = 0.3


async def submit_all(api: httpx.AsyncClient, args: argparse.Namespace) -> dict[str, Path]:
    """Submit every file; returns eval_id -> file. Refused files are reported and skipped."""
    bodies = [
        {"code": path.read_text(), "language": args.language, "timeout": args.timeout} for path in args.files
    ]
    ids: dict[str, Path] = {}
    if args.batch:
        for start in range(0, len(bodies), BATCH):
            answer = await api.post("/api/eval-batch", json={"evaluations": bodies[start : start + BATCH]})
            answer.raise_for_status()
            for index, item in enumerate(answer.json()["evaluations"]):
                path = args.files[start + index]
                if item["status"] == "queued":
                    ids[item["eval_id"]] = path
                else:
                    print(f"{path}: refused: {item['error']}", file=sys.stderr)
        return ids
    for path, body in zip(args.files, bodies, strict=True):
        answer = await api.post("/api/eval", json={**body, "priority": args.priority})
        if answer.status_code != 200:
            print(f"{path}: refused ({answer.status_code}): {answer.text[:200]}", file=sys.stderr)
            continue
        ids[answer.json()["eval_id"]] = path
    return ids


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


def print_table(ids: dict[str, Path], results: dict[str, dict[str, Any]]) -> None:
    print(f"{'file':<32} {'eval_id':<32} {'status':<22} {'ms':>7}  output")
    for eval_id, path in ids.items():
        r = results[eval_id]
        output = (r.get("output") or r.get("error") or "").strip().splitlines()
        print(f"{str(path)[:32]:<32} {eval_id:<32} {r['status']:<22} {r.get('runtime_ms') or 0:>7}  "
              f"{(output[0] if output else '')[:60]}")  # fmt: skip


async def run(args: argparse.Namespace) -> int:
    headers = {"x-api-key": args.api_key} if args.api_key else {}
    async with httpx.AsyncClient(base_url=args.api, timeout=60, headers=headers) as api:
        ids = await submit_all(api, args)
        results = await wait_all(api, list(ids), args.wait)
    if args.json:
        print(json.dumps([{"file": str(ids[i]), **results[i]} for i in ids], indent=2))
    else:
        print_table(ids, results)
    return 0 if ids and all(r["status"] == "completed" for r in results.values()) else 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", type=Path, help="source files, one evaluation each")
    parser.add_argument("--api", default="http://127.0.0.1:8080", help="the API's base URL")
    parser.add_argument(
        "--api-key", default=os.environ.get("CRUCIBLE_API_KEY"), help="API key (default: $CRUCIBLE_API_KEY)"
    )
    parser.add_argument("--language", default="python")
    parser.add_argument("--timeout", type=float, default=30)
    parser.add_argument("--batch", action="store_true", help="send as batches (low queue)")
    parser.add_argument("--priority", action="store_true", help="high queue (not with --batch)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--wait", type=float, default=3600, help="give up waiting after this many seconds")
