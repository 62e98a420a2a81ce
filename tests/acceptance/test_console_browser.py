"""The console in a real browser (Debian's chromium through Playwright) against a real
``quarry serve`` and real ``celery -A worker worker`` processes on PostgreSQL and Redis.

Screenshots of each page go to ``artifacts/console/``. Without a browser these tests
are skipped locally; in CI (which installs chromium) they are required.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.acceptance.harness import REPO, Cluster, serve_api, wait_for
from tests.conftest import require
from worker.models import Level, NewEntry, Status

pytestmark = pytest.mark.acceptance

CHROMIUM = Path(os.environ.get("QUARRY_TEST_CHROMIUM", "/usr/bin/chromium"))
ARTIFACTS = REPO / "artifacts" / "console"
#: Stored text that would run or restyle something if it were ever markup.
INJECTIONS = (
    "<script>window.__pwned=1</script>",
    '"><img src=x onerror="window.__pwned=2">',
    "\x1b[31mred\x1b[0m and \u2028 a line separator",
)


@dataclass
class Console:
    """A cluster, the API and console on it, and where it answers."""

    cluster: Cluster
    api: subprocess.Popen[bytes]
    base: str
    log: Path

    def restart_api(self) -> None:
        """Stop ``quarry serve`` and start it again on the same port (a dropped connection)."""
        self.api.send_signal(signal.SIGTERM)
        self.api.wait(timeout=30)
        port = int(self.base.rsplit(":", 1)[1])
        self.api, _ = serve_api(self.cluster.env, self.log, port=port)

    def token(self, scope: str) -> str:
        """A new token's secret."""
        _, secret = self.cluster.store.create_token(scope, scope.replace(":", "-"))
        return secret


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless chromium (Debian's package: Playwright cannot download a browser here)."""
    if not CHROMIUM.exists():
        require("Chromium", FileNotFoundError(str(CHROMIUM)))
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield instance
        instance.close()


@pytest.fixture
def console(tmp_path: Path, pg_url: str, redis_url: str) -> Iterator[Console]:
    """Two workers, beat (the watchdog), and the console, on Redis and PostgreSQL."""
    cluster = Cluster(tmp_path, database_url=pg_url, broker_url=redis_url)
    cluster.beat()
    log = tmp_path / "api.log"
    api, base = serve_api(cluster.env, log)
    c = Console(cluster, api, base, log)
    yield c
    with contextlib.suppress(Exception):
        c.api.send_signal(signal.SIGTERM)
        c.api.wait(timeout=30)
    cluster.close()


class Tab:
    """A signed-in browser page that records dialogs and script errors."""

    def __init__(self, browser: Any, base: str, secret: str) -> None:
        self.context = browser.new_context(base_url=base, viewport={"width": 1400, "height": 900})
        self.page = self.context.new_page()
        self.dialogs: list[str] = []
        self.errors: list[str] = []
        self.page.on("dialog", self._dialog)
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        self.page.goto("/runs")
        self.page.wait_for_url("**/signin**")
        self.shot("signin")
        self.page.fill("#token", secret)
        self.page.click("form[action='/signin'] button[type=submit]")
        self.page.wait_for_url("**/runs")

    def _dialog(self, dialog: Any) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()

    def new_page(self) -> Any:
        """Another tab of the same session."""
        page = self.context.new_page()
        page.on("dialog", self._dialog)
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        return page

    def fetch_status(self, path: str, page: Any = None) -> int:
        """What the page's own request to ``path`` answers."""
        return int((page or self.page).evaluate("p => fetch(p).then(r => r.status)", path))

    def shot(self, name: str, page: Any = None) -> None:
        """A screenshot, kept as a test artefact."""
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        (page or self.page).screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)

    def close(self) -> None:
        """Close the session's pages."""
        self.context.close()


def until(page: Any, script: str, what: str, timeout: float = 30) -> None:
    """Poll ``script`` (a function) in the page until it is truthy. Playwright's own
    wait_for_function evaluates strings, which the page's CSP rightly refuses."""
    wait_for(lambda: page.evaluate(script), what, timeout)


def log_ids(page: Any) -> list[int]:
    """The entry ids of the log lines on the page, in order."""
    return [
        int(i) for i in page.eval_on_selector_all("#log .line", "ls => ls.map(l => l.dataset.id)")
    ]


def test_each_scope_sees_what_it_may(browser: Any, console: Console) -> None:
    """operator: trigger and cancel; read: everything, no buttons; gateway: its runs only, also
    through the page's own requests; revoking or signing out ends the session and its views."""
    store = console.cluster.store
    mine = store.create_run("small", gateway="edge").id
    theirs = store.create_run("small", gateway="other").id
    plain = store.create_run("slow").id  # no worker: it stays queued, its stream open

    operator = Tab(browser, console.base, console.token("operator"))
    operator.page.goto("/pipelines")
    assert operator.page.locator("form.trigger").count() == 2
    operator.shot("pipelines")
    operator.page.goto(f"/runs/{plain}")
    assert operator.page.locator("#cancel").count() == 1

    reader = Tab(browser, console.base, console.token("read"))
    rows = reader.page.eval_on_selector_all("tr[data-run]", "rs => rs.map(r => r.dataset.run)")
    assert {mine, theirs, plain} <= set(rows)
    reader.page.goto("/pipelines")
    assert reader.page.locator("form.trigger").count() == 0
    reader.page.goto(f"/runs/{plain}")
    assert reader.page.locator("#cancel").count() == 0
    assert reader.fetch_status("/api/v1/action-runs/" + plain) == 200

    edge = Tab(browser, console.base, console.token("gateway:edge"))
    rows = edge.page.eval_on_selector_all("tr[data-run]", "rs => rs.map(r => r.dataset.run)")
    assert rows == [mine]
    edge.page.goto("/runs?gateway=other")
    rows = edge.page.eval_on_selector_all("tr[data-run]", "rs => rs.map(r => r.dataset.run)")
    assert rows == [mine]
    for other in (theirs, plain):
        assert edge.page.goto(f"/runs/{other}").status == 404
        for suffix in ("", "/logs", "/telemetry", "/logs/stream"):
            assert edge.fetch_status(f"/api/v1/action-runs/{other}{suffix}") == 404
    listed = edge.page.evaluate("fetch('/api/v1/action-runs').then(r => r.json())")
    assert [r["id"] for r in listed["runs"]] == [mine]
    edge.shot("runs-gateway")

    # Revoking the read token: the runs page's next live refresh sends it to sign in.
    reader.page.goto("/runs")
    token_id = next(t.id for t in store.list_tokens() if t.scope == "read")
    store.revoke_token(token_id)
    reader.page.wait_for_url("**/signin**", timeout=20_000)

    # Signing out in one tab ends the open live log of another tab of the same session.
    follower = operator.new_page()
    follower.goto(f"/runs/{plain}")
    until(
        follower,
        "() => document.getElementById('log-state').textContent.includes('live')",
        "the log to go live",
    )
    operator.page.goto("/runs")
    operator.page.click("form[action='/signout'] button")
    operator.page.wait_for_url("**/signin")
    # The open page's next live refresh is refused, and it goes to the sign-in form.
    follower.wait_for_url("**/signin**", timeout=20_000)
    assert operator.page.goto("/runs").url.endswith("/signin?next=%2Fruns")
    for tab in (operator, reader, edge):
        assert tab.dialogs == [] and tab.errors == []
        tab.close()


def test_trigger_watch_and_follow_the_log_through_a_dropped_stream_and_a_deploy(
    browser: Any, console: Console
) -> None:
    """From the Pipelines page to run_completed: the runs table updates without a reload, and
    the live log shows every entry exactly once across a restart of the API (the stream drops
    and resumes by Last-Event-ID) and a SIGTERM of the worker mid-run (another resumes it)."""
    cluster = console.cluster
    workers = {"a": cluster.worker("a"), "b": cluster.worker("b")}
    tab = Tab(browser, console.base, console.token("operator"))
    page = tab.page
    page.goto("/pipelines")
    form = page.locator("article[data-pipeline='slow'] form.trigger")
    form.locator("textarea").fill('{"page_latency_ms": 250}')
    form.locator("button").click()
    page.wait_for_url("**/runs/run_*")
    run_id = page.url.rsplit("/", 1)[1]

    runs = tab.new_page()
    runs.goto("/runs")
    runs.evaluate("window.__stayed = true")  # gone if the page reloads
    runs.wait_for_selector(f"tr[data-run='{run_id}'][data-status='running']", timeout=60_000)

    def slices_shown() -> int:
        return int(page.locator("#log .line[data-event='slice_completed']").count())

    wait_for(lambda: slices_shown() >= 3, "three slices on the page")
    console.restart_api()  # every open stream drops; the browser reconnects on its own
    wait_for(lambda: slices_shown() >= 8, "the log to go on after the API restart", 90)
    holder = cluster.store.get_run(run_id).lease_owner
    assert holder in workers
    workers[holder].signal_group(signal.SIGTERM)  # a rolling deploy of the worker
    page.wait_for_selector("#log .line[data-event='run_interrupted']", timeout=60_000)
    page.wait_for_selector("#run-header[data-status='succeeded']", timeout=120_000)
    page.wait_for_selector("#log .line[data-event='run_completed']", timeout=30_000)
    runs.wait_for_selector(f"tr[data-run='{run_id}'][data-status='succeeded']", timeout=30_000)
    assert runs.evaluate("window.__stayed") is True

    stored = [e.id for e in cluster.entries(run_id)]
    shown = log_ids(page)
    assert len(shown) == len(set(shown)), "a line was shown twice"
    assert shown == stored, "the page's log is not the run's log"
    ended = page.eval_on_selector_all(
        "#attempts tr[data-ended]", "rs => rs.map(r => r.dataset.ended)"
    )
    assert ended[0] == "interrupted" and ended[-1] == "completed", ended
    points = int(page.get_attribute(".spark[data-series='progress']", "data-points") or 0)
    assert points >= 2
    drawn = page.evaluate(
        """() => { const c = document.querySelector(".spark[data-series='progress'] canvas");
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i]) n++; return n; }"""
    )
    assert drawn > 0, "the sparkline canvas is blank"
    tab.shot("run")
    tab.shot("runs", runs)
    assert tab.dialogs == [] and tab.errors == []
    tab.close()


def test_cancel_from_the_page(browser: Any, console: Console) -> None:
    cluster = console.cluster
    cluster.worker("a")
    run_id = cluster.trigger("slow", page_latency_ms=250)
    tab = Tab(browser, console.base, console.token("operator"))
    page = tab.page
    page.goto(f"/runs/{run_id}")
    page.wait_for_selector("#run-header[data-status='running']", timeout=60_000)
    page.click("#cancel summary")
    page.click("#cancel-confirm")
    page.wait_for_selector("#run-header[data-status='cancelled']", timeout=60_000)
    assert cluster.store.get_run(run_id).status is Status.CANCELLED
    page.wait_for_selector("#log .line[data-event='run_cancelled']", timeout=30_000)
    tab.close()


def test_stored_text_is_inert_on_every_page(browser: Any, console: Console) -> None:
    store = console.cluster.store
    evil = "".join(INJECTIONS)
    run_id = store.create_run(evil).id
    assert store.acquire(run_id, "<i>w</i>", 30) is not None
    store.append_entries(
        [
            NewEntry(
                run_id=run_id, level=Level.ERROR, event="<b>evil</b>", message=text,
                occurred_at=datetime.now(UTC), data={"text": text}, worker_id="<i>w</i>",
                attempt=1,
            )
            for text in (*INJECTIONS, "x" * 65536)
        ]
    )  # fmt: skip
    epoch = store.get_run(run_id).lease_epoch
    store.transition(
        run_id, Status.RUNNING, Status.FAILED, expected_epoch=epoch, error_summary=evil * 100
    )
    tab = Tab(browser, console.base, console.token("operator"))
    page = tab.page
    page.goto("/runs")
    assert INJECTIONS[0] in page.inner_text("table.runs")
    page.goto(f"/runs/{run_id}")
    until(page, "() => document.querySelectorAll('#log .line').length === 4", "the four lines")
    text = page.inner_text("#log")
    assert INJECTIONS[0] in text and INJECTIONS[1] in text
    assert "\\u001b[31mred" in text and "\\u2028" in text  # shown as escapes, not acted on
    assert page.evaluate("window.__pwned") is None
    assert page.evaluate("document.querySelectorAll('#log img, #log script').length") == 0
    # Nothing pushes the page sideways; the 64 KiB line stays a few lines tall until opened.
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")
    heights = page.eval_on_selector_all("#log .line", "ls => ls.map(l => l.offsetHeight)")
    assert max(heights) < 120
    page.click("#log .line >> nth=0")
    assert INJECTIONS[0] in page.inner_text("#log .line >> nth=0 >> pre")
    page.click("#log-first-error")
    page.wait_for_selector("#log .line.hit")
    tab.shot("run-injections")
    page.goto("/pipelines")
    assert tab.dialogs == [] and tab.errors == []
    assert page.evaluate("window.__pwned") is None
    tab.close()


def test_a_long_log_pages_in_older_lines_within_its_cap_and_filters(
    browser: Any, console: Console
) -> None:
    """A 6,000-entry run: it opens at its tail, scrolling up pages older lines in and never
    holds more than 2,000; the level and event filters read filtered pages; the rows/s and
    bytes sparklines are drawn from the samples."""
    store = console.cluster.store
    run_id = store.create_run("demo").id
    lease = store.acquire(run_id, "w1", 30)
    assert lease is not None
    now = datetime.now(UTC)

    def entry(i: int) -> NewEntry:
        level = Level.ERROR if i == 4321 else Level.WARNING if i % 100 == 0 else Level.INFO
        event = "boom" if i == 4321 else "slice_completed"
        return NewEntry(run_id, level, event, f"line {i}", now, {"i": i}, "w1", 1)

    store.append_entries([entry(i) for i in range(6000)])
    for minutes, rows in ((3, 0), (2, 5000), (1, 12000)):
        at = now - timedelta(minutes=minutes)
        store.append_sample(run_id, {"rows_loaded": rows, "bytes_loaded": rows * 40}, at=at)
    store.finish(lease, Status.SUCCEEDED)
    ids = [e.id for e in store.entries(run_id, limit=10_000)]  # the 6,000 and the end

    tab = Tab(browser, console.base, console.token("read"))
    page = tab.page
    page.goto(f"/runs/{run_id}")
    until(page, "() => document.querySelectorAll('#log .line').length >= 500", "the tail")
    assert log_ids(page) == ids[-500:]
    held = []
    for _ in range(8):  # 8 pages of 500 older lines
        before = log_ids(page)[0]
        page.evaluate("() => { document.getElementById('log').scrollTop = 0; }")
        wait_for(lambda before=before: log_ids(page)[0] < before, "an older page")
        shown = log_ids(page)
        held.append(len(shown))
        assert shown == ids[ids.index(shown[0]) : ids.index(shown[0]) + len(shown)]
    assert max(held) == 2000, held  # never more, and reading back fills the page
    assert log_ids(page)[0] == ids[-4500]

    page.select_option("#log-level", "warning")
    until(
        page,
        "() => [...document.querySelectorAll('#log .line')].every(l => !l.matches('.l-info'))"
        " && document.querySelectorAll('#log .line').length > 0",
        "warnings and errors only",
    )
    wait_for(lambda: len(log_ids(page)) == 61, "every warning and the error")
    page.select_option("#log-level", "")
    page.fill("#log-event", "boom")
    until(page, "() => document.querySelectorAll('#log .line').length === 1", "the one event")
    assert page.get_attribute("#log .line", "data-event") == "boom"
    for series in ("rate", "bytes"):
        wait_for(
            lambda series=series: (
                int(page.get_attribute(f".spark[data-series='{series}']", "data-points") or 0) == 3
            ),
            f"the {series} sparkline's points",
        )
        drawn = page.evaluate(
            """s => { const c = document.querySelector(`.spark[data-series='${s}'] canvas`);
            const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i]) n++; return n; }""",
            series,
        )
        assert drawn > 0, f"the {series} sparkline is blank"
    tab.shot("run-long-log")
    assert tab.dialogs == [] and tab.errors == []
    tab.close()
