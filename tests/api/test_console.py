"""The console over HTTP: sign-in and sessions, scopes, CSRF, escaping, security headers.

The browser's view of the same pages (live updates, the log, the charts) is
``tests/acceptance/test_console_browser.py``; these run without a browser.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from worker.api import create_app
from worker.models import Level, NewEntry
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
