"""The dashboard in a real browser (Debian's headless Chromium driven by Playwright).

Against a running stack: the overview shows live workers and queues, an evaluation appears
without a reload and is terminated with its button, dead letters are retried (one, then
several) and deleted with theirs. Screenshots of each page go to test-artifacts/screenshots.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack, contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from playwright.async_api import Page, async_playwright, expect

from bench.stack import ROOT, free_port, process, wait_http
from tests.conftest import Stack, stack_env, start_stack
from tests.helpers import TEST_ADMIN_KEY, api_client, submit, wait_final

SHOTS = ROOT / "test-artifacts" / "screenshots"
#: As the machine's notes advise for root in a closed network.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture
async def page() -> AsyncIterator[Page]:
    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium is missing: ./dev test installs it (apt-get install chromium)"
    SHOTS.mkdir(parents=True, exist_ok=True)
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        page = await browser.new_page(viewport={"width": 1300, "height": 1000})
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        yield page
        await browser.close()
    assert not errors, errors


#: A program with test cases: doubles its input, but answers 3 wrong (and says what it read on stderr).
CASES_PROGRAM = (
    "import sys\nn = int(input())\nprint('read', n, file=sys.stderr)\nprint(7 if n == 3 else n + n)\n"
)
HOSTILE_NAME = "<img src=x onerror=alert(1)>"
CASES = [
    {"name": HOSTILE_NAME, "stdin": "1", "expected_output": "2"},
    {"name": "doubles 2", "stdin": "2", "expected_output": "4"},
    {"name": "doubles 3", "stdin": "3", "expected_output": "6"},
]


@contextmanager
def receiver() -> Iterator[str]:
    """A webhook receiver on loopback that takes everything (the stack allows 127.0.0.1)."""

    class Taker(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length") or 0))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Taker)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook"
    finally:
        server.shutdown()


async def dead_letter(api: httpx.AsyncClient) -> str:
    """A real dead letter: the executor refuses a time-out above its own maximum (422, not retried)."""
    eval_id = await submit(api, "print('too patient')", timeout=90)
    assert (await wait_final(api, eval_id))["status"] == "failed"
    return f"celery-{eval_id}"


async def test_the_dashboard_shows_and_steers_the_system(
    page: Page, redis_url: str, executor_url: str, namespace: str
) -> None:
    # The executor allows 60 s; this stack's API accepts 120 s, so a 90 s request dead-letters.
    # One worker slot, so a second evaluation waits (to be cancelled while queued).
    env = stack_env(
        redis_url, namespace, executor_url,
        CRUCIBLE_MAX_TIMEOUT="120", CELERY_CONCURRENCY="1", CRUCIBLE_WORKER_THREADS="1",
        CRUCIBLE_WEBHOOK_ALLOW_HOSTS="127.0.0.1",
    )  # fmt: skip
    with ExitStack() as stack:
        s: Stack = start_stack(stack, "dashboard", env)
        port = free_port()
        stack.enter_context(process("dashboard", "dashboard", {**s.env, "DASHBOARD_PORT": str(port)}))
        board = f"http://127.0.0.1:{port}"
        wait_http(f"{board}/health")
        async with api_client(s.api_url) as api:
            assert "Crucible" in (await api.get("/dashboard")).text  # also under the API
            for n in range(2):
                await wait_final(api, await submit(api, f"print({n})"))
            hostile = await submit(api, "print('<img src=x onerror=\"window.pwned=1\">')")
            await wait_final(api, hostile)

            # Without a key the page shows nothing but the request for one.
            await page.goto(board)
            await expect(page.get_by_test_id("updated")).to_contain_text("API key is required")
            await page.get_by_test_id("key").fill(TEST_ADMIN_KEY)
            await page.get_by_test_id("use-key").click()
            workers = page.get_by_test_id("workers").locator("tbody tr")
            await expect(workers).to_have_count(1)
            await expect(workers.first).to_contain_text("online")
            await expect(page.get_by_test_id("queues").locator("tbody tr")).to_have_count(3)
            await expect(page.get_by_test_id("chart-throughput").locator("circle").first).to_be_attached()
            await expect(page.get_by_test_id("hour-summary")).to_contain_text("3 finished")
            await page.screenshot(path=SHOTS / "dashboard-overview.png", full_page=True)

            # Evaluations: hostile output is shown as text, never run as markup.
            await page.get_by_role("link", name="Evaluations").click()
            await page.locator(f"tr[data-eval='{hostile}']").click()
            await expect(page.get_by_test_id("detail-output")).to_contain_text(
                '<img src=x onerror="window.pwned=1">'
            )
            assert await page.evaluate("window.pwned") is None
            assert await page.locator("#detail img").count() == 0
            await expect(page.get_by_test_id("detail-tests")).to_be_hidden()  # no cases: as before

            # Test cases: the verdict, the compile step, a row per case (its name is text, however
            # hostile), each case's output and error in a row that opens below it.
            dialogs: list[str] = []
            page.on("dialog", lambda dialog: dialogs.append(dialog.message))
            judged = await submit(api, CASES_PROGRAM, tests=CASES)
            assert (await wait_final(api, judged))["verdict"] == "wrong_answer"
            await page.locator(f"tr[data-eval='{judged}']").click()
            verdict = page.get_by_test_id("detail-verdict")
            await expect(verdict).to_have_text("Verdict: wrong_answer — 2/3 passed")
            await expect(verdict.locator(".status-wrong_answer")).to_be_visible()
            compiled = page.get_by_test_id("detail-compile")
            await expect(compiled).to_have_text("Compile: none (an interpreted language)")
            cases = page.get_by_test_id("detail-cases").locator("tbody tr.case")
            await expect(cases).to_have_count(3)
            await expect(cases.locator("td.name")).to_have_text([HOSTILE_NAME, "doubles 2", "doubles 3"])
            statuses = cases.locator("td:nth-child(4)")
            await expect(statuses).to_have_text(["accepted", "accepted", "wrong_answer"])
            await expect(statuses.nth(0)).to_have_class("status-accepted")
            await expect(statuses.nth(2)).to_have_class("status-wrong_answer")
            await expect(cases.nth(2).locator("td").last).to_have_text("line 1: expected '6', got '7'")
            await expect(cases.nth(0).locator("td.num").first).to_contain_text(" ms")
            await expect(cases.nth(0).locator("td.num").last).to_contain_text(" KiB")
            shown = page.locator("tr[data-case-io='2']")
            await expect(shown).to_be_hidden()
            await cases.nth(2).click()
            await expect(shown.locator("[data-io=output]")).to_have_text("7")
            await expect(shown.locator("[data-io=error]")).to_have_text("read 3")
            await expect(shown).to_contain_text("exit code 0")
            polled = await page.get_by_test_id("updated").text_content()
            await expect(page.get_by_test_id("updated")).not_to_have_text(polled or "")
            await expect(shown).to_be_visible()  # still open after the next poll
            assert await page.locator("#detail img").count() == 0 and dialogs == []
            await page.screenshot(path=SHOTS / "dashboard-test-cases.png", full_page=True)

            # A webhook's delivery: its state, attempts and where it went.
            with receiver() as url:
                hooked = await submit(api, "print('hooked')", callback_url=url)
                await wait_final(api, hooked)
                await page.locator(f"tr[data-eval='{hooked}']").click()
                delivery = page.locator("[data-field=webhook]")
                await expect(delivery).to_have_text(f"delivered, 1 attempt → {url}")

            # New ones show up live; cancel the waiting one, terminate the running one.
            slow = await submit(api, "import time; time.sleep(60)")
            row = page.locator(f"tr[data-eval='{slow}']")
            await expect(row).to_contain_text("running", timeout=10_000)
            waiting = await submit(api, "print('never runs')")
            await page.get_by_test_id("filter-status").select_option("queued")
            await expect(page.get_by_test_id("evaluations").locator("tbody tr")).to_have_count(1)
            await page.locator(f"tr[data-eval='{waiting}']").click()
            await page.get_by_test_id("cancel").click()
            await expect(page.get_by_test_id("action-result")).to_have_text(
                "Task cancelled successfully (was pending in queue)"
            )
            await expect(page.locator("[data-field=status]")).to_have_text("cancelled")
            await page.get_by_test_id("filter-status").select_option("")
            await row.click()
            await expect(page.get_by_test_id("detail-code")).to_have_text("import time; time.sleep(60)")
            await page.get_by_test_id("terminate").click()
            await expect(page.get_by_test_id("action-result")).to_have_text(
                "Task forcefully terminated (was running)"
            )
            await expect(page.locator("[data-field=status]")).to_have_text("cancelled")
            await expect(page.get_by_test_id("detail-timeline")).to_contain_text("running → cancelled")
            await page.get_by_test_id("search").fill(slow[-8:])
            await expect(page.get_by_test_id("evaluations").locator("tbody tr")).to_have_count(1)
            await page.screenshot(path=SHOTS / "dashboard-evaluation.png", full_page=True)
            assert (await api.get(f"/api/eval/{slow}")).json()["status"] == "cancelled"
            assert (await api.get(f"/api/eval/{waiting}")).json()["status"] == "cancelled"

            # Dead letters: detail with traceback, retry one, retry selected, delete.
            first, second, third = [await dead_letter(api) for _ in range(3)]
            await page.get_by_role("link", name="Dead letters").click()
            await expect(page.get_by_test_id("dlq-stats")).to_contain_text("3 dead letters")
            await expect(page.get_by_test_id("dlq-stats")).to_contain_text("ExecutorHTTPError: 3")
            await page.locator(f"tr[data-task='{first}'] td").nth(1).click()
            await expect(page.get_by_test_id("dlq-traceback")).to_contain_text("Traceback")
            await page.screenshot(path=SHOTS / "dashboard-dead-letters.png", full_page=True)

            await page.locator(f"button[data-retry='{first}']").click()
            await expect(page.get_by_test_id("dlq-result")).to_have_text(f"Task {first} re-queued")
            timeline = (await api.get(f"/api/eval/{first.removeprefix('celery-')}/timeline")).json()["events"]
            assert [e["status"] for e in timeline].count("queued") == 2  # it ran again (and failed again)

            await page.locator(f"input[data-check='{second}']").check()
            await page.locator(f"input[data-check='{third}']").check()
            await page.get_by_test_id("dlq-retry-selected").click()
            await expect(page.get_by_test_id("dlq-result")).to_have_text("2 retried, 0 failed")

            await expect(page.locator(f"tr[data-task='{second}']")).to_be_attached(
                timeout=15_000
            )  # failed again
            await page.locator(f"button[data-delete='{second}']").click()
            await expect(page.locator(f"tr[data-task='{second}']")).to_have_count(0)
            assert (await api.get(f"/api/dlq/tasks/{second}")).status_code == 404
