"""The console over HTTP: sign-in and sessions, scopes, CSRF, escaping, security headers.

The browser's view of the same pages (live updates, the log, the charts) is
``tests/acceptance/test_console_browser.py``; these run without a browser.
"""

from __future__ import annotations

import html
import re
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from worker import control
from worker.api import create_app
from worker.console import pages
from worker.models import Lease, Level, NewEntry, Status
from worker.settings import Settings
from worker.store import Store

EVIL = '<script>window.__pwned=1</script>"><img src=x onerror="window.__pwned=2">\x1b[31m\u2028'
SAME_ORIGIN = {"Origin": "http://testserver"}


@pytest.fixture
def app_store(sqlite_url: str, tmp_path: Path) -> Iterator[tuple[TestClient, Store]]:
    """The API and console on an embedded store, and that store."""
    app = create_app(Settings(database_url=sqlite_url, data_dir=tmp_path))
    with TestClient(app) as client:
        yield client, app.state.store


def sign_in(client: TestClient, store: Store, scope: str) -> str:
    """Sign ``client`` in with a new token of ``scope``; returns its CSRF secret."""
    _, secret = store.create_token(scope, scope.replace(":", "-"))
    response = client.post(
        "/signin", data={"token": secret, "next": "/runs"}, headers=SAME_ORIGIN,
        follow_redirects=False,
    )  # fmt: skip
    assert response.status_code == 303, response.text
    assert response.headers["location"] == "/runs"
    page = client.get("/runs")
    match = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert match is not None
    return match.group(1)


def test_pages_need_a_session_and_sign_in_sets_a_strict_cookie(
    app_store: tuple[TestClient, Store],
) -> None:
    client, store = app_store
    response = client.get("/runs?status=failed", follow_redirects=False)
    assert response.status_code == 303
    assert response.headers["location"] == "/signin?next=%2Fruns%3Fstatus%3Dfailed"
    # htmx's fragment refresh is told where to go instead of being redirected.
    response = client.get("/runs/table", headers={"HX-Request": "true"}, follow_redirects=False)
    assert response.status_code == 401
    assert response.headers["HX-Redirect"] == "/signin"
    bad = client.post("/signin", data={"token": "qry_nope"}, headers=SAME_ORIGIN)
    assert bad.status_code == 401
    assert "not valid" in bad.text
    _, secret = store.create_token("read", "viewer")
    good = client.post(
        "/signin", data={"token": secret, "next": "//evil.example/x"}, headers=SAME_ORIGIN,
        follow_redirects=False,
    )  # fmt: skip
    assert good.headers["location"] == "/runs"  # never another origin
    cookie = good.headers["set-cookie"]
    assert cookie.startswith("quarry_session=qrs_")
    for attribute in ("HttpOnly", "SameSite=strict", "Max-Age=43200", "Path=/"):
        assert attribute in cookie
    assert "Secure" not in cookie  # plain HTTP here; over TLS it is set (next test)
    assert secret not in cookie


def test_over_tls_the_cookie_is_secure(sqlite_url: str, tmp_path: Path) -> None:
    app = create_app(Settings(database_url=sqlite_url, data_dir=tmp_path))
    with TestClient(app, base_url="https://console.example") as client:
        _, secret = app.state.store.create_token("read")
        response = client.post(
            "/signin", data={"token": secret}, follow_redirects=False,
            headers={"Origin": "https://console.example"},
        )  # fmt: skip
        assert "Secure" in response.headers["set-cookie"]


def test_tokens_never_travel_in_urls_and_other_origins_are_refused(
    app_store: tuple[TestClient, Store],
) -> None:
    client, store = app_store
    _, secret = store.create_token("operator")
    assert client.get(f"/signin?token={secret}").status_code == 400
    assert client.get(f"/runs?access_token={secret}").status_code == 400
    cross = client.post("/signin", data={"token": secret}, headers={"Origin": "http://evil"})
    assert cross.status_code == 403
    cross = client.post("/signin", data={"token": secret}, headers={"Sec-Fetch-Site": "cross-site"})
    assert cross.status_code == 403


def test_every_page_has_a_strict_csp_and_no_inline_script_or_style(
    app_store: tuple[TestClient, Store],
) -> None:
    client, store = app_store
    run = store.create_run("demo")
    sign_in(client, store, "operator")
    for path in ("/signin", "/runs", "/runs/table", "/strip", f"/runs/{run.id}", "/pipelines"):
        response = client.get(path)
        assert response.status_code == 200, (path, response.text)
        csp = response.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp
        assert "frame-ancestors 'none'" in csp
        assert response.headers["x-content-type-options"] == "nosniff"
        html = response.text
        assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html), path  # no inline script
        assert not re.search(r"\sstyle=", html), path
        assert not re.search(r"\son[a-z]+=", html), path  # no inline handlers
    static = client.get("/static/console.js")
    assert static.status_code == 200
    assert static.headers["x-content-type-options"] == "nosniff"


def test_each_scope_is_offered_what_it_may_do(app_store: tuple[TestClient, Store]) -> None:
    client, store = app_store
    run = store.create_run("demo")
    csrf = sign_in(client, store, "read")
    assert "Trigger a run" not in client.get("/pipelines").text
    assert 'id="cancel"' not in client.get(f"/runs/{run.id}").text
    refused = client.post(f"/runs/{run.id}/cancel", data={"csrf": csrf}, headers=SAME_ORIGIN)
    assert refused.status_code == 403
    refused = client.post("/pipelines/demo/trigger", data={"csrf": csrf}, headers=SAME_ORIGIN)
    assert refused.status_code == 403
    client.cookies.clear()
    csrf = sign_in(client, store, "operator")
    assert "Trigger a run" in client.get("/pipelines").text
    assert 'id="cancel"' in client.get(f"/runs/{run.id}").text
    # CSRF: a missing or wrong secret is refused, the page's own form is not.
    assert client.post(f"/runs/{run.id}/cancel", data={"csrf": "x"}).status_code == 403
    assert client.post(f"/runs/{run.id}/cancel", data={}).status_code == 422
    done = client.post(
        f"/runs/{run.id}/cancel", data={"csrf": csrf}, headers=SAME_ORIGIN,
        follow_redirects=False,
    )  # fmt: skip
    assert done.status_code == 303
    assert store.get_run(run.id).status.value == "cancelled"
    # The API with the cookie: reads as the token; a change needs X-CSRF-Token.
    assert client.get(f"/api/v1/action-runs/{run.id}").status_code == 200
    assert client.post("/api/v1/action-runs", json={"pipeline": "demo"}).status_code == 403


def test_a_gateway_session_sees_only_its_gateway(app_store: tuple[TestClient, Store]) -> None:
    client, store = app_store
    mine = store.create_run("demo", gateway="edge")
    theirs = store.create_run("demo", gateway="other")
    plain = store.create_run("demo")
    sign_in(client, store, "gateway:edge")
    table = client.get("/runs").text
    assert mine.id in table
    assert theirs.id not in table and plain.id not in table
    # A URL asking for another gateway gets this one's runs all the same.
    assert theirs.id not in client.get("/runs/table?gateway=other").text
    for other in (theirs.id, plain.id):
        assert client.get(f"/runs/{other}").status_code == 404
        for suffix in ("", "/logs", "/telemetry"):
            assert client.get(f"/api/v1/action-runs/{other}{suffix}").status_code == 404
    listed = client.get("/api/v1/action-runs").json()["runs"]
    assert [r["id"] for r in listed] == [mine.id]
    assert client.get(f"/api/v1/action-runs/{mine.id}/telemetry").status_code == 200


def test_signing_out_and_revoking_both_end_the_session(
    app_store: tuple[TestClient, Store],
) -> None:
    client, store = app_store
    csrf = sign_in(client, store, "read")
    assert client.post("/signout", data={"csrf": "wrong"}).status_code == 403
    out = client.post("/signout", data={"csrf": csrf}, headers=SAME_ORIGIN, follow_redirects=False)
    assert out.status_code == 303
    assert (
        'quarry_session=""' in out.headers["set-cookie"] or "Max-Age=0" in out.headers["set-cookie"]
    )
    cookie = client.cookies.get("quarry_session")
    assert cookie is None
    # A copied cookie of a signed-out session opens nothing.
    sign_in(client, store, "read")
    copied = client.cookies["quarry_session"]
    token_id = store.get_session(copied).token.id  # type: ignore[union-attr]
    store.revoke_token(token_id)
    assert client.get("/runs", follow_redirects=False).status_code == 303
    assert client.get("/api/v1/action-runs").status_code == 401


def test_stored_text_renders_inert(app_store: tuple[TestClient, Store]) -> None:
    client, store = app_store
    run = store.create_run(EVIL, gateway=None)
    store.append_entries(
        [
            NewEntry(
                run_id=run.id, level=Level.ERROR, event="evil", message=EVIL * 2000,
                occurred_at=datetime.now(UTC), data={"x": EVIL}, worker_id=EVIL, attempt=1,
            )
        ]
    )  # fmt: skip
    sign_in(client, store, "operator")
    for path in ("/runs", f"/runs/{run.id}"):
        html = client.get(path).text
        assert "<script>window.__pwned" not in html
        assert "<img src=x" not in html
        assert "\x1b" not in html and "\u2028" not in html
        assert "&lt;script&gt;window.__pwned=1&lt;/script&gt;" in html


def test_trigger_form_names_the_bad_field(app_store: tuple[TestClient, Store]) -> None:
    client, store = app_store
    csrf = sign_in(client, store, "operator")
    for params, status, words in (
        ("{not json", 422, "params: not valid JSON"),
        ("[1, 2]", 422, "params: expected a JSON object"),
        ('{"profiles": -1}', 422, "params.profiles"),
    ):
        response = client.post(
            "/pipelines/demo/trigger", data={"csrf": csrf, "params": params},
            headers=SAME_ORIGIN,
        )  # fmt: skip
        assert response.status_code == status, response.text
        assert words in response.text
        assert "<html" in response.text  # the page again, with the problem shown
    missing = client.post("/pipelines/nope/trigger", data={"csrf": csrf}, headers=SAME_ORIGIN)
    assert missing.status_code == 404
    assert store.list_runs() == []


def test_the_vendored_files_match_their_pins() -> None:
    """What ``python -m worker.console.vendor`` fetched is what is on disk (checked offline)."""
    result = subprocess.run(
        [sys.executable, "-m", "worker.console.vendor", "--check"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def row_ids(html: str) -> list[str]:
    """The runs table's rows, in page order."""
    return re.findall(r'<tr data-run="([^"]+)"', html)


def test_the_runs_table_filters_and_pages_through_its_url(
    app_store: tuple[TestClient, Store],
) -> None:
    """Status and pipeline filters, cursor pages of 50 (newest first, each run once), shareable
    links that keep the filters, and a 400 naming a bad filter."""
    client, store = app_store
    alpha = [store.create_run("alpha").id for _ in range(60)]
    beta = [store.create_run("beta").id for _ in range(3)]
    for run_id in beta[:2]:
        control.cancel(store, run_id)
    sign_in(client, store, "read")
    assert row_ids(client.get("/runs?pipeline=beta").text) == beta[::-1]
    assert row_ids(client.get("/runs?status=cancelled").text) == beta[:2][::-1]
    assert row_ids(client.get("/runs?status=cancelled&pipeline=alpha").text) == []

    first = client.get("/runs?pipeline=alpha").text
    assert row_ids(first) == alpha[::-1][:50]
    older = re.search(r'href="/runs\?([^"]+)" rel="next"', first)
    assert older is not None and "pipeline=alpha" in older.group(1)
    second = client.get(f"/runs?{html.unescape(older.group(1))}").text
    assert row_ids(second) == alpha[::-1][50:]
    assert 'rel="next"' not in second and "« Newest" in second
    # The live refresh reads the same view.
    assert (
        row_ids(client.get(f"/runs/table?{html.unescape(older.group(1))}").text)
        == (alpha[::-1][50:])
    )

    for query, words in (
        ("status=weird", "status: Input should be"),
        ("cursor=run_nope", "cursor: no such run in this view"),
        ("colour=red", "colour: Extra inputs are not permitted"),
    ):
        bad = client.get(f"/runs?{query}")
        assert bad.status_code == 400, (query, bad.text)
        assert words in bad.text, (query, bad.text)


def test_the_strip_and_the_header_say_how_things_stand(
    app_store: tuple[TestClient, Store],
) -> None:
    """The dashboard strip counts what the store holds; a run's header puts its checkpoint in
    words (``events: slice 37/104``)."""
    client, store = app_store
    pages._STRIPS._entries.clear()
    running = store.create_run("demo")
    lease = store.acquire(running.id, "w1", 30)
    assert isinstance(lease, Lease)
    store.commit(
        lease,
        checkpoint={
            "resources": {"events": {"status": "in_progress", "next_slice": 38}},
            "position": {"resource": "events", "slice": 37, "slices": 104},
        },
    )
    # Its telemetry: 200 rows before the last hour, 1,434 now: 1,234 in the hour.
    store.append_sample(running.id, {"rows_loaded": 100}, at=datetime.now(UTC) - timedelta(hours=2))
    store.append_sample(
        running.id, {"rows_loaded": 200}, at=datetime.now(UTC) - timedelta(minutes=50)
    )
    store.append_sample(running.id, {"rows_loaded": 1434})
    store.create_run("demo")
    failed = store.create_run("demo")
    failed_lease = store.acquire(failed.id, "w2", 30)
    assert isinstance(failed_lease, Lease)
    store.finish(failed_lease, Status.FAILED, error_summary="boom")
    sign_in(client, store, "read")
    strip = client.get("/strip").text
    counts = dict(re.findall(r'data-k="(\w+)">([\d,]+)<', strip))
    assert counts == {
        "running": "1",
        "queued": "1",
        "succeeded": "0",
        "failed": "1",
        "rows": "1,234",
        "interrupted": "0",
        "recovered": "0",
    }
    header = client.get(f"/runs/{running.id}").text
    assert '<dd id="run-checkpoint">events: slice 37/104</dd>' in header


def test_the_pipelines_page_shows_each_pipelines_last_runs(
    app_store: tuple[TestClient, Store],
) -> None:
    client, store = app_store
    ended = store.create_run("demo")
    control.cancel(store, ended.id)
    newest = store.create_run("demo")
    sign_in(client, store, "read")
    page = client.get("/pipelines").text
    chips = re.findall(r'<a class="chip s-(\w+)" href="/runs/([^"]+)"', page)
    assert chips[:2] == [("queued", newest.id), ("cancelled", ended.id)]
    assert "Trigger a run" not in page  # read scope: no buttons
