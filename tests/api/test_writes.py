"""Triggering, cancelling, the flat view and request limits over the real API server."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from tests.api.test_api import Api, api, api_server  # noqa: F401 - the server fixtures
from worker.models import Level, NewEntry, Status


def test_trigger_needs_an_operator_and_a_known_pipeline(api: Api) -> None:  # noqa: F811
    """POST runs: 201 for an operator, 403 for a read token, 404 for an unknown pipeline."""
    operator, read = api.token("operator"), api.token("read")
    denied = api.client.post("/api/v1/action-runs", json={"pipeline": "demo"}, headers=read)
    assert denied.status_code == 403
    assert "operator" in denied.json()["error"]["message"]
    unknown = api.client.post("/api/v1/action-runs", json={"pipeline": "nope"}, headers=operator)
    assert unknown.status_code == 404
    assert "unknown pipeline 'nope'" in unknown.json()["error"]["message"]
    # The file is named, never where the server keeps it.
    assert "pipelines.toml" in unknown.json()["error"]["message"]
    assert "/" not in unknown.json()["error"]["message"]
    created = api.client.post(
        "/api/v1/action-runs",
        json={"pipeline": "demo", "params": {"profiles": 3}},
        headers=operator,
    )
    assert created.status_code == 201, created.text
    run = api.store.get_run(created.json()["id"])
    assert run.params == {"profiles": 3}
    assert run.status is Status.QUEUED


def test_bad_bodies_are_4xx_json_and_store_nothing(api: Api) -> None:  # noqa: F811
    """Malformed JSON, wrong types, unknown fields, oversized bodies: 4xx, JSON, no run."""
    operator = api.token("operator")
    before = len(api.store.list_runs())
    cases = [
        (b"{not json", 422),
        (b'{"pipeline": 5}', 422),
        (b'{"pipeline": "demo", "extra": 1}', 422),
        (b'{"pipeline": "demo", "params": ' + b'"x"' + b"}", 422),
    ]
    for body, status in cases:
        response = api.client.post(
            "/api/v1/action-runs",
            content=body,
            headers={**operator, "Content-Type": "application/json"},
        )
        assert response.status_code == status, (body, response.text)
        assert "error" in response.json()
    huge = b'{"pipeline": "demo", "params": {"x": "' + b"a" * (1024 * 1024) + b'"}}'
    too_big = api.client.post(
        "/api/v1/action-runs",
        content=huge,
        headers={**operator, "Content-Type": "application/json"},
    )
    assert too_big.status_code == 413
    assert too_big.json()["error"]["status"] == 413
    assert len(api.store.list_runs()) == before


def test_cancel_over_http(api: Api) -> None:  # noqa: F811
    """POST cancel ends a queued run; cancelling an ended run is a 409."""
    operator = api.token("operator")
    run = api.store.create_run("demo")
    done = api.client.post(f"/api/v1/action-runs/{run.id}/cancel", headers=operator)
    assert done.json()["status"] == "cancelled"
    again = api.client.post(f"/api/v1/action-runs/{run.id}/cancel", headers=operator)
    assert again.status_code == 409
    assert (
        api.client.post(
            f"/api/v1/action-runs/{run.id}/cancel", headers=api.token("read")
        ).status_code
        == 403
    )


def test_flat_view_filters_and_pages(api: Api) -> None:  # noqa: F811
    """/api/v1/logs across runs: filters, from/to in ms and ISO, count bounds, no cursor at the end."""
    a = api.store.create_run("alpha")
    b = api.store.create_run("beta")
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    api.store.append_entries(
        [
            NewEntry(
                run.id,
                Level.INFO,
                event,
                f"{run.pipeline} {i}",
                t0 + timedelta(minutes=i),
                {"i": i},
                worker,
            )
            for i, (run, event, worker) in enumerate(
                [
                    (a, "slice_completed", "w1"),
                    (b, "slice_completed", "w2"),
                    (a, "run_completed", "w1"),
                    (b, "run_failed", "w2"),
                ]
            )
        ]
    )
    read = api.token("read")

    def get(**params: object) -> dict[str, object]:
        response = api.client.get("/api/v1/logs", params=params, headers=read)
        assert response.status_code == 200, response.text
        return response.json()  # type: ignore[no-any-return]

    def messages(body: dict[str, object]) -> list[str]:
        return [e["message"] for e in body["entries"]]  # type: ignore[attr-defined,index]

    assert messages(get(pipeline="alpha")) == ["alpha 0", "alpha 2"]
    assert messages(get(event="slice_completed")) == ["alpha 0", "beta 1"]
    assert messages(get(worker_id="w2")) == ["beta 1", "beta 3"]
    assert messages(get(run_id=b.id, event="run_failed")) == ["beta 3"]
    ms = int((t0 + timedelta(minutes=1)).timestamp() * 1000)
    assert messages(get(**{"from": ms, "to": "2026-01-01T00:02:00Z"})) == ["beta 1", "alpha 2"]
    first = get(count=3)
    assert len(first["entries"]) == 3  # type: ignore[arg-type]
    rest = get(count=3, cursor=first["cursor"])
    assert messages(rest) == ["beta 3"]
    assert "cursor" not in rest
    for bad in ({"count": 0}, {"count": 1001}, {"from": "yesterday"}, {"cursor": "-1"}):
        response = api.client.get("/api/v1/logs", params=bad, headers=read)
        assert 400 <= response.status_code < 500, bad
        assert "error" in response.json()
    gateway = api.client.get("/api/v1/logs", headers=api.token("gateway:east"))
    assert gateway.status_code == 403


def test_metrics_are_prometheus_text(api: Api) -> None:  # noqa: F811
    """/metrics: runs by status, per-pipeline counters, stream clients (every series is
    checked in tests/api/test_metrics.py)."""
    api.store.create_run("demo")
    text = api.client.get("/metrics").text
    assert 'quarry_runs{status="queued"} 1.0' in text
    assert 'quarry_run_recoveries_total{kind="expired_lease",pipeline="demo"} 0.0' in text
    assert "quarry_stream_clients 0.0" in text
    assert "# TYPE quarry_log_entries_total counter" in text


def test_runs_page_by_cursor_and_filter_by_gateway(api: Api) -> None:  # noqa: F811
    """Runs list newest first in pages; the cursor is null on the last; gateway filters."""
    read = api.token("read")
    made = [api.store.create_run("demo", gateway="east" if i % 2 else None).id for i in range(5)]
    assert api.run_ids_paged("/api/v1/action-runs", read, limit=2) == made[::-1]
    east = api.client.get("/api/v1/action-runs", params={"gateway": "east"}, headers=read).json()
    assert [r["id"] for r in east["runs"]] == [made[3], made[1]]
    bad = api.client.get("/api/v1/action-runs", params={"cursor": "run_nope"}, headers=read)
    assert bad.status_code == 404  # a cursor names a run: an unknown one is not found
