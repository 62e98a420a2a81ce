"""Findings of the adversarial review, one test each, on the real API server.

Each holds a class of input, not only the example the review found: the review
is repeated with other inputs.
"""

from __future__ import annotations

import inspect
import os
import secrets
import socket
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import psutil
import pytest
from fastapi import FastAPI
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from tests.acceptance.harness import serve_api
from tests.api.test_api import Api, api, api_server  # noqa: F401 - the server fixtures
from tests.conftest import PG_ADMIN_URL
from worker.models import Level, NewEntry, Status
from worker.store import Store


def _nested(depth: int) -> Any:
    value: Any = {"leaf": 1}
    for _ in range(depth):
        value = {"x": value}
    return value


def _patch(api: Api, run_id: str, headers: dict[str, str], body: Any) -> Any:  # noqa: F811
    return api.client.patch(f"/api/v1/action-runs/{run_id}", json=body, headers=headers)


def _claimed(api: Api, gateway: str = "east") -> tuple[str, dict[str, str], int]:  # noqa: F811
    headers = api.token(f"gateway:{gateway}")
    run = api.store.create_run("demo", gateway=gateway)
    claim = _patch(api, run.id, headers, {"status": "running"})
    assert claim.status_code == 200, claim.text
    return run.id, headers, claim.json()["leaseEpoch"]


def test_chunked_body_is_refused_while_read_with_flat_memory(api: Api) -> None:  # noqa: F811
    """A 64 MiB chunked body with no token: 413 once the limit is passed, memory stays flat."""
    process = psutil.Process(api.process.pid)
    before = process.memory_info().rss
    host, port = urlsplit(api.url).hostname, urlsplit(api.url).port
    chunk = b"a" * 65536
    with socket.create_connection((host, port), timeout=10) as conn:
        conn.sendall(
            b"POST /api/v1/action-runs HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        sent = 0
        try:
            while sent < 64 * 1024 * 1024:
                conn.sendall(b"%x\r\n%b\r\n" % (len(chunk), chunk))
                sent += len(chunk)
        except OSError:
            pass  # the server answered and closed: that is the point
        answer = conn.recv(65536)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b'"status":413' in answer
    assert sent < 64 * 1024 * 1024 or process.memory_info().rss - before < 32 * 1024 * 1024
    assert process.memory_info().rss - before < 32 * 1024 * 1024


@pytest.mark.parametrize(
    "field",
    ["telemetrySummary", "appendLog.data", "appendTelemetrySample", "params"],
)
def test_deep_or_huge_json_is_refused_at_write(api: Api, field: str) -> None:  # noqa: F811
    """Nesting past 32 levels, integers past 64 bits, NaN: 422 naming the field, nothing stored."""
    run_id, headers, epoch = _claimed(api)
    operator = api.token("operator")
    for bad in (_nested(40), {"n": 2**64}, {"n": -(2**63) - 1}, {"n": [0] * 10_001}):
        if field == "params":
            response = api.client.post(
                "/api/v1/action-runs", json={"pipeline": "demo", "params": bad}, headers=operator
            )
        elif field == "appendLog.data":
            body = {"leaseEpoch": epoch, "appendLog": {"message": "m", "data": bad}}
            response = _patch(api, run_id, headers, body)
        else:
            response = _patch(api, run_id, headers, {"leaseEpoch": epoch, field: bad})
        assert response.status_code == 422, (field, response.text[:300])
        assert response.json()["error"]["status"] == 422
    assert api.store.get_run(run_id).telemetry_summary == {}
    assert [e.event for e in api.store.entries(run_id)] == ["lease_acquired"]
    assert len(api.store.list_runs()) == 1
    assert _patch(api, run_id, headers, {"leaseEpoch": epoch, field: _nested(20)}).status_code in {
        200,
        422,  # params are not a PATCH field
    }


def test_a_stored_value_no_reader_can_encode_takes_no_list_down(api: Api) -> None:  # noqa: F811
    """A run stored with 250-deep params (as written before bounds): lists, logs, agent runs work."""
    bad = api.store.create_run("demo", {"deep": _nested(250)}, gateway="east")
    good = api.store.create_run("demo", {"ok": 1}, gateway="east")
    api.store.append_entries(
        [NewEntry(bad.id, Level.INFO, "log", "deep", datetime.now(UTC), {"d": _nested(250)})]
    )
    read, east = api.token("read"), api.token("gateway:east")
    runs = api.client.get("/api/v1/action-runs", headers=read)
    assert runs.status_code == 200
    by_id = {r["id"]: r for r in runs.json()["runs"]}
    assert by_id[good.id]["params"] == {"ok": 1}
    assert "deep" in by_id[bad.id]["params"] or "unreadable" in by_id[bad.id]["params"]
    assert api.client.get(f"/api/v1/action-runs/{bad.id}", headers=read).status_code == 200
    assert api.client.get("/api/v1/agent/runs", headers=east).status_code == 200
    logs = api.client.get(f"/api/v1/action-runs/{bad.id}/logs", headers=read)
    assert logs.status_code == 200
    assert logs.json()["entries"][0]["message"] == "deep"
    assert api.client.get("/api/v1/logs", headers=read).status_code == 200


def test_patch_reaches_only_gateway_runs_and_no_lifecycle_event(api: Api) -> None:  # noqa: F811
    """A worker's run cannot be PATCHed with its epoch; runtime event names are refused."""
    operator = api.token("operator")
    worker_run = api.store.create_run("demo")
    lease = api.store.acquire(worker_run.id, "celery@host", 30)
    assert lease is not None
    hijack = _patch(
        api, worker_run.id, operator, {"leaseEpoch": lease.epoch, "status": "succeeded"}
    )
    assert hijack.status_code == 409
    assert api.store.get_run(worker_run.id).status is Status.RUNNING
    run_id, headers, epoch = _claimed(api)
    for event in ("run_completed", "run_failed", "lease_acquired", "slice_completed"):
        forged = {"leaseEpoch": epoch, "appendLog": {"message": "x", "event": event}}
        assert _patch(api, run_id, headers, forged).status_code == 422
        replaced = {"leaseEpoch": epoch, "logEntries": [{"message": "x", "event": event}]}
        assert _patch(api, run_id, headers, replaced).status_code == 422
    assert [e.event for e in api.store.entries(run_id)] == ["lease_acquired"]
    queued = _patch(api, run_id, headers, {"leaseEpoch": epoch, "status": "queued"})
    assert queued.status_code == 422
    too_big = _patch(api, run_id, headers, {"leaseEpoch": 2**63, "appendLog": {"message": "x"}})
    assert too_big.status_code == 422


def test_a_refused_patch_changes_nothing(api: Api) -> None:  # noqa: F811
    """A PATCH with a refused part applies no part: log, samples and summary stay as they were."""
    run_id, headers, epoch = _claimed(api)
    assert _patch(api, run_id, headers, {"leaseEpoch": epoch, "appendLog": {"message": "kept"}})
    before = [e.message for e in api.store.entries(run_id)]
    refusals = [
        {
            "leaseEpoch": epoch,
            "logEntries": [{"message": "gone"}],
            "telemetrySummary": {"n": 2**64},
        },
        {
            "leaseEpoch": epoch + 7,
            "logEntries": [{"message": "gone"}],
            "telemetrySamples": [{"a": 1}],
        },
        {
            "leaseEpoch": epoch,
            "logEntries": [{"message": "gone"}],
            "finishedAt": "2000-01-01T00:00:00Z",
            "status": "failed",
        },
        {"leaseEpoch": epoch, "logEntries": [{"message": "gone", "at": "1970-01-01T00:00:00Z"}]},
    ]
    for body in refusals:
        response = _patch(api, run_id, headers, body)
        assert 400 <= response.status_code < 500, (body, response.text)
        assert [e.message for e in api.store.entries(run_id)] == before
        assert api.store.samples(run_id) == []
    ended = _patch(api, run_id, headers, {"leaseEpoch": epoch, "status": "failed"})
    assert ended.status_code == 200, ended.text
    after_end = [e.message for e in api.store.entries(run_id)]
    late = _patch(api, run_id, headers, {"status": "succeeded", "logEntries": [{"message": "x"}]})
    assert late.status_code == 409
    assert [e.message for e in api.store.entries(run_id)] == after_end


def test_client_times_are_bounded(api: Api) -> None:  # noqa: F811
    """``at`` in 1970 or 9999 and a ``finishedAt`` before the run began are refused (422)."""
    run_id, headers, epoch = _claimed(api)
    for at in ("1970-01-01T00:00:00Z", "9999-12-31T23:59:59Z"):
        body = {"leaseEpoch": epoch, "appendLog": {"message": "m", "at": at}}
        response = _patch(api, run_id, headers, body)
        assert response.status_code == 422
        assert "appendLog.at" in response.json()["error"]["message"]
    early = _patch(
        api,
        run_id,
        headers,
        {"leaseEpoch": epoch, "status": "succeeded", "finishedAt": "2000-01-01"},
    )
    assert early.status_code == 422
    assert "finishedAt" in early.json()["error"]["message"]
    now = datetime.now(UTC)
    fine = {"leaseEpoch": epoch, "appendLog": {"message": "m", "at": now.isoformat()}}
    assert _patch(api, run_id, headers, fine).status_code == 200


def test_a_gateway_sees_its_queue_behind_any_backlog(api: Api) -> None:  # noqa: F811
    """1,001 queued runs of gateway Q do not hide gateway A's 6; pages reach every one."""
    for _ in range(1001):
        api.store.create_run("demo", gateway="q")
    mine = [api.store.create_run("demo", gateway="a").id for _ in range(6)]
    headers = api.token("gateway:a")
    assert api.run_ids_paged("/api/v1/agent/runs", headers, limit=4) == mine


def test_bad_telemetry_is_refused_and_stored_junk_renders(api: Api) -> None:  # noqa: F811
    """Known telemetry fields are typed and ranged on write (422)."""
    run_id, headers, epoch = _claimed(api)
    for summary in (
        {"progress": "abc"},
        {"progress": 101},
        {"rowsLoaded": -1},
        {"rows_loaded": 1.5},
        {"currentPhase": 3},
    ):
        response = _patch(api, run_id, headers, {"leaseEpoch": epoch, "telemetrySummary": summary})
        assert response.status_code == 422, summary
    ok = {"leaseEpoch": epoch, "telemetrySummary": {"progress": 50.5, "rowsLoaded": 7}}
    assert _patch(api, run_id, headers, ok).status_code == 200


def test_secrets_in_params_are_never_stored_or_shown(api: Api) -> None:  # noqa: F811
    """Params under secret keys or holding credential shapes are scrubbed before they are stored."""
    operator, read = api.token("operator"), api.token("read")
    params = {
        "password": "hunter2hunter2",
        "api_key": "AKIAABCDEFGHIJKLMNOP",
        "url": "postgresql://u:pw-s3cret@h/db",
        "nested": {"token": "tok-abcdef123456"},
    }
    # A gateway's runner reads its params itself: any names, scrubbed all the same.
    created = api.client.post(
        "/api/v1/action-runs",
        json={"pipeline": "demo", "params": params, "gateway": "east"},
        headers=operator,
    )
    assert created.status_code == 201, created.text
    run_id = created.json()["id"]
    shown = api.client.get(f"/api/v1/action-runs/{run_id}", headers=read).text
    stored = str(api.store.get_run(run_id).params)
    for secret in ("hunter2hunter2", "AKIAABCDEFGHIJKLMNOP", "pw-s3cret", "tok-abcdef123456"):
        assert secret not in created.text
        assert secret not in shown
        assert secret not in stored


@pytest.mark.parametrize(
    ("path", "params", "headers"),
    [
        ("/api/v1/action-runs/{run}/logs", {"cursor": "²"}, {}),
        ("/api/v1/action-runs/{run}/logs", {"cursor": "⑦"}, {}),
        ("/api/v1/action-runs/{run}/logs", {"cursor": "١٢٣"}, {}),
        ("/api/v1/logs", {"cursor": "0" * 40}, {}),
        ("/api/v1/logs", {"to": "9999-12-31T23:59:59-05:00"}, {}),
        ("/api/v1/logs", {"from": "0001-01-01T00:00:00+05:00"}, {}),
        ("/api/v1/logs", {"from": "-99999999999999999"}, {}),
        ("/api/v1/action-runs/{run}/logs", {"to": "99999999999999999999"}, {}),
        ("/api/v1/action-runs/{run}/logs", {"level": "loud"}, {}),
    ],
)
def test_odd_parameters_get_a_json_4xx(
    api: Api,  # noqa: F811
    path: str,
    params: dict[str, str],
    headers: dict[str, str],
) -> None:
    """Non-ASCII digits, datetime edges, huge numbers: a JSON 4xx, never a 500."""
    run = api.store.create_run("demo")
    response = api.client.get(
        path.format(run=run.id), params=params, headers={**api.token("read"), **headers}
    )
    assert 400 <= response.status_code < 500 or response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    if "cursor" in params:
        assert response.status_code == 400


def test_a_non_ascii_last_event_id_is_a_4xx(api: Api) -> None:  # noqa: F811
    """A ``Last-Event-ID`` byte outside ASCII is refused as JSON, the connection kept."""
    run = api.store.create_run("demo")
    response = api.client.get(
        f"/api/v1/action-runs/{run.id}/logs/stream",
        headers={**api.token("read"), "Last-Event-ID": b"\xb2"},
    )
    assert response.status_code == 400
    assert response.json()["error"]["status"] == 400


def test_a_cursor_outside_the_view_says_nothing_about_existence(api: Api) -> None:  # noqa: F811
    """Another gateway's run id as a cursor answers as an unknown id does."""
    other = api.store.create_run("demo", gateway="west")
    edge = api.token("gateway:east")
    existing = api.client.get("/api/v1/action-runs", params={"cursor": other.id}, headers=edge)
    missing = api.client.get("/api/v1/action-runs", params={"cursor": "run_nope"}, headers=edge)
    assert existing.status_code == missing.status_code == 404
    assert existing.json()["error"]["message"] == missing.json()["error"]["message"]


def test_unknown_parameters_are_refused_and_seed_spellings_map(api: Api) -> None:  # noqa: F811
    """A misspelled filter is a 400 naming it; the seed's spellings filter as ours do."""
    read = api.token("read")
    a, b = api.store.create_run("demo"), api.store.create_run("demo")
    now = datetime.now(UTC)
    api.store.append_entries(
        [
            NewEntry(a.id, Level.INFO, "run_completed", "done", now),
            NewEntry(b.id, Level.INFO, "log", "x", now),
            NewEntry(b.id, Level.INFO, "log", "y", now),
        ]
    )
    for path, params in (
        ("/api/v1/logs", {"runIdd": a.id}),
        ("/api/v1/logs", {"evnt": "log"}),
        (f"/api/v1/action-runs/{a.id}/logs", {"levle": "error"}),
        ("/api/v1/action-runs", {"stauts": "queued"}),
        (f"/api/v1/action-runs/{a.id}", {"x": "1"}),
    ):
        response = api.client.get(path, params=params, headers=read)
        assert response.status_code == 400, (path, response.text)
        assert next(iter(params)) in response.json()["error"]["message"]

    def flat(**params: object) -> list[str]:
        body = api.client.get("/api/v1/logs", params=params, headers=read).json()
        return [e["message"] for e in body["entries"]]

    assert flat(state="RUN_COMPLETED") == ["done"]
    assert flat(runId=b.id) == ["x", "y"]
    assert flat(workflowRunId=b.id, limit=1) == ["x"]
    assert flat(count=2) == ["done", "x"]
    since = int((now - timedelta(minutes=1)).timestamp() * 1000)
    assert flat(fromDate=since, runId=a.id) == ["done"]


@pytest.mark.postgres
def test_store_unreachable_is_a_json_503(pg_url: str, tmp_path: Path) -> None:
    """With the store's database gone after startup: JSON 503 with Retry-After, /readyz says why."""
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"quarry_gone_{secrets.token_hex(4)}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(pg_url).set(database=name).render_as_string(hide_password=False)
    store = Store(url)
    store.upgrade()
    _, secret = store.create_token("read")
    store.close()
    env = {**os.environ, "QUARRY_DATABASE_URL": url, "QUARRY_DATA_DIR": str(tmp_path)}
    process, base = serve_api(env, tmp_path / "api.log")
    try:
        client = httpx.Client(base_url=base, timeout=10)
        headers = {"Authorization": f"Bearer {secret}"}
        assert client.get("/api/v1/action-runs", headers=headers).status_code == 200
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        for path in ("/api/v1/action-runs", "/api/v1/logs", "/readyz"):
            response = client.get(path, headers=headers)
            assert response.status_code == 503, (path, response.text)
            assert response.headers["content-type"].startswith("application/json")
        assert client.get("/api/v1/logs", headers=headers).headers["retry-after"]
    finally:
        process.terminate()
        process.wait(timeout=10)
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
    log = (tmp_path / "api.log").read_text()
    assert "Traceback" not in log


def test_readiness_covers_the_broker_and_outages_log_one_line(
    sqlite_url: str, tmp_path: Path
) -> None:
    """An API whose broker (Redis) is unreachable is not ready, and says so without tracebacks."""
    env = {
        **os.environ,
        "QUARRY_DATABASE_URL": sqlite_url,
        "QUARRY_DATA_DIR": str(tmp_path),
        "QUARRY_BROKER_URL": "redis://:pw-canary-31@127.0.0.1:1/0",
    }
    process, base = serve_api(env, tmp_path / "api.log")
    try:
        ready = httpx.get(f"{base}/readyz", timeout=30)
        assert ready.status_code == 503
        assert "broker unreachable" in ready.json()["error"]["message"]
        assert "pw-canary-31" not in ready.text
        store = Store(sqlite_url)
        _, secret = store.create_token("operator")
        store.close()
        trigger = httpx.post(
            f"{base}/api/v1/action-runs",
            json={"pipeline": "demo"},
            headers={"Authorization": f"Bearer {secret}"},
            timeout=60,
        )
        # Stored and queued for the watchdog to publish once the broker is back.
        assert trigger.status_code == 201, trigger.text
        assert trigger.json()["status"] == "queued"
    finally:
        process.terminate()
        process.wait(timeout=10)
    log = (tmp_path / "api.log").read_text()
    assert "Traceback" not in log
    assert "pw-canary-31" not in log
    assert log.count("wake-up subscription lost") == 1


def test_an_unexpected_error_is_a_json_500(sqlite_url: str, tmp_path: Path) -> None:
    """A bug in a route answers a JSON 500 (its traceback goes to the log, not the client)."""
    from fastapi.testclient import TestClient

    from worker.api import create_app
    from worker.settings import Settings

    app = create_app(Settings(database_url=sqlite_url, data_dir=tmp_path))

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("a bug at /srv/quarry/secret_path.py")

    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/boom")
    assert response.status_code == 500
    assert response.json() == {"error": {"status": 500, "message": "internal error"}}


def test_params_are_checked_against_the_source_when_triggered(api: Api) -> None:  # noqa: F811
    """A param the source would refuse is a 422 naming it, and no run is queued."""
    operator = api.token("operator")
    for params, field in (
        ({"profiles": -1}, "params.profiles"),
        ({"profilez": 3}, "params.profilez"),
    ):
        response = api.client.post(
            "/api/v1/action-runs", json={"pipeline": "demo", "params": params}, headers=operator
        )
        assert response.status_code == 422, response.text
        assert field in response.json()["error"]["message"]
    assert api.store.list_runs() == []


_COUNT_SPANS = """
import sys
from contextlib import contextmanager
from fastapi import FastAPI
from fastapi.testclient import TestClient
from opentelemetry import trace
from worker.api import create_app
from worker.settings import Settings

started = []

class Tracer(trace.NoOpTracer):
    def start_span(self, name, *args, **kwargs):
        started.append(name)
        return super().start_span(name, *args, **kwargs)

    @contextmanager
    def start_as_current_span(self, name, *args, **kwargs):
        started.append(name)
        yield trace.INVALID_SPAN

class Provider(trace.TracerProvider):
    def get_tracer(self, *args, **kwargs):
        return Tracer()

trace.set_tracer_provider(Provider())
bare = FastAPI()
bare.get("/ping")(lambda: {})
with TestClient(bare) as client:
    client.get("/ping")
control = len(started)
app = create_app(Settings(database_url=sys.argv[1], data_dir=sys.argv[2]))
with TestClient(app) as client:
    client.get("/healthz")
    client.post("/api/v1/action-runs", json={"pipeline": 7, "params": {"password": "hunter22"}})
print(control, len(started) - control)
"""


def test_fastapi_telemetry_stays_off_under_a_configured_provider(
    sqlite_url: str, tmp_path: Path
) -> None:
    """A process with an OpenTelemetry provider (and FastAPI's auto-configuration asked for
    in the environment) gets no span from Quarry's API: FastAPI's own telemetry would
    record requests, and validation failures with their input, unscrubbed."""
    if "telemetry" not in inspect.signature(FastAPI.__init__).parameters:
        pytest.skip("this FastAPI has no telemetry of its own")
    done = subprocess.run(
        [sys.executable, "-c", _COUNT_SPANS, sqlite_url, str(tmp_path)],
        env={**os.environ, "FASTAPI_OTEL_AUTO_CONFIGURE": "true"},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    control, quarry = (int(n) for n in done.stdout.split())
    assert control > 0  # the provider does see a plain FastAPI app's requests
    assert quarry == 0
