"""The HTTP API on a real uvicorn server (``quarry serve``), read with httpx."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from tests.acceptance.harness import serve_api
from tests.conftest import truncate
from worker.models import Level, NewEntry
from worker.store import Store

QUARRY = Path(sys.executable).parent / "quarry"


class Api:
    """A running ``quarry serve`` and the store behind it."""

    def __init__(self, url: str, store: Store, process: subprocess.Popen[bytes]) -> None:
        self.url = url
        self.store = store
        self.process = process
        self.client = httpx.Client(base_url=url, timeout=10)

    def run_ids_paged(self, path: str, headers: dict[str, str], limit: int) -> list[str]:
        """Every run id of a runs listing, read ``limit`` a page by its cursor until it is null."""
        seen: list[str] = []
        cursor: str | None = None
        while True:
            params = {"limit": limit, **({"cursor": cursor} if cursor else {})}
            body = self.client.get(path, params=params, headers=headers).json()
            seen += [r["id"] for r in body["runs"]]
            cursor = body["cursor"]
            if cursor is None:
                return seen

    def token(self, scope: str) -> dict[str, str]:
        """Headers carrying a fresh token of ``scope``."""
        _, secret = self.store.create_token(scope)
        return {"Authorization": f"Bearer {secret}"}


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def api_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, str, subprocess.Popen[bytes]]]:
    """``quarry serve`` on a free port over each store, shared by a module's tests (starting
    one per test cost most of the API tier's time); returns the store URL, base URL, process."""
    tmp_path = tmp_path_factory.mktemp("api")
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'quarry.db'}"
        Store(url).upgrade()
    else:
        url = request.getfixturevalue("pg_url")
    env = {
        **os.environ,
        "QUARRY_DATABASE_URL": url,
        "QUARRY_DATA_DIR": str(tmp_path),
        "QUARRY_PIPELINES_FILE": str(Path(__file__).resolve().parents[2] / "pipelines.toml"),
    }
    process, base = serve_api(env, tmp_path / "api.log")
    yield url, base, process
    process.terminate()
    process.wait(timeout=10)


@pytest.fixture
def api(api_server: tuple[str, str, subprocess.Popen[bytes]]) -> Iterator[Api]:
    """The module's server over an emptied store: each test starts from nothing."""
    url, base, process = api_server
    truncate(url)
    store = Store(url)
    yield Api(base, store, process)
    store.close()


def test_health_and_readiness(api: Api) -> None:
    """/healthz answers; /readyz checks the store and its schema."""
    assert api.client.get("/healthz").json() == {"status": "ok"}
    assert api.client.get("/readyz").json() == {"status": "ready"}


def test_auth_is_required_and_errors_are_json(api: Api) -> None:
    """No token, a wrong token, a revoked token, a token in the URL: refused with a JSON body."""
    run = api.store.create_run("demo")
    path = f"/api/v1/action-runs/{run.id}"
    missing = api.client.get(path)
    assert missing.status_code == 401
    assert missing.json()["error"]["message"] == "missing bearer token"
    assert api.client.get(path, headers={"Authorization": "Bearer qry_nope"}).status_code == 401
    token, secret = api.store.create_token("read")
    headers = {"Authorization": f"Bearer {secret}"}
    assert api.client.get(path, headers=headers).status_code == 200
    assert api.store.revoke_token(token.id)
    assert api.client.get(path, headers=headers).status_code == 401
    in_url = api.client.get(path, params={"token": secret}, headers=api.token("read"))
    assert in_url.status_code == 400
    assert secret not in in_url.text


def test_runs_list_get_and_404(api: Api) -> None:
    """Runs list newest first and filter; an unknown run is a JSON 404."""
    headers = api.token("read")
    a = api.store.create_run("alpha")
    b = api.store.create_run("beta")
    listed = api.client.get("/api/v1/action-runs", headers=headers).json()["runs"]
    assert [r["id"] for r in listed] == [b.id, a.id]
    only = api.client.get("/api/v1/action-runs", params={"pipeline": "alpha"}, headers=headers)
    assert [r["id"] for r in only.json()["runs"]] == [a.id]
    assert (
        api.client.get(f"/api/v1/action-runs/{a.id}", headers=headers).json()["status"] == "queued"
    )
    missing = api.client.get("/api/v1/action-runs/run_nope", headers=headers)
    assert missing.status_code == 404
    assert missing.json() == {"error": {"status": 404, "message": "no run run_nope"}}
    bad = api.client.get(
        "/api/v1/action-runs", params={"status": "weird", "limit": 0}, headers=headers
    )
    assert bad.status_code == 400  # a malformed query parameter
    assert "status" in bad.json()["error"]["message"]
    assert "limit" in bad.json()["error"]["message"]


def test_gateway_token_sees_only_its_gateway(api: Api) -> None:
    """A gateway token lists and reads only runs targeted at its gateway; others are 404."""
    mine = api.store.create_run("demo", gateway="east")
    other = api.store.create_run("demo", gateway="west")
    headers = api.token("gateway:east")
    listed = api.client.get("/api/v1/action-runs", headers=headers).json()["runs"]
    assert [r["id"] for r in listed] == [mine.id]
    assert api.client.get(f"/api/v1/action-runs/{other.id}", headers=headers).status_code == 404
    assert (
        api.client.get(f"/api/v1/action-runs/{other.id}/logs", headers=headers).status_code == 404
    )


def test_logs_page_by_cursor_without_gap_or_repeat(api: Api) -> None:
    """2,500 entries in pages of 1,000: every entry once, in order; no cursor on the last page."""
    run = api.store.create_run("demo")
    now = datetime.now(UTC)
    levels = [Level.INFO, Level.WARNING, Level.ERROR]
    api.store.append_entries(
        [NewEntry(run.id, levels[i % 3], "e", f"m{i}", now, {"i": i}) for i in range(2500)]
    )
    headers = api.token("read")
    seen: list[int] = []
    cursor: str | None = None
    pages = 0
    while True:
        params = {"cursor": cursor} if cursor else {}
        body = api.client.get(
            f"/api/v1/action-runs/{run.id}/logs", params=params, headers=headers
        ).json()
        seen += [e["data"]["i"] for e in body["entries"]]
        pages += 1
        cursor = body["cursor"]
        if cursor is None:
            break
    assert seen == list(range(2500))
    assert pages == 3
    warn = api.client.get(
        f"/api/v1/action-runs/{run.id}/logs", params={"level": "warn", "limit": 5}, headers=headers
    ).json()["entries"]
    assert [e["level"] for e in warn] == ["warning", "error", "warning", "error", "warning"]
    entry = warn[0]
    assert set(entry) == {
        "id",
        "run_id",
        "level",
        "event",
        "message",
        "data",
        "worker_id",
        "attempt",
        "occurred_at",
    }
    bad = api.client.get(
        f"/api/v1/action-runs/{run.id}/logs", params={"cursor": "abc"}, headers=headers
    )
    assert bad.status_code == 400
    assert bad.json()["error"]["message"].startswith("cursor:")
