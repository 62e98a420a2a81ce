"""Pipelines over the real API: list with schedule and state, pause and resume, backfill,
forced cancel; bad input is a 4xx naming the field, and creates nothing."""

from __future__ import annotations

from tests.api.test_api import Api, api, api_server  # noqa: F401 - the server fixtures
from worker.models import Status


def test_pipelines_list_shows_schedule_and_state(api: Api) -> None:  # noqa: F811
    read = api.token("read")
    listed = api.client.get("/api/v1/pipelines", headers=read)
    assert listed.status_code == 200, listed.text
    by_name = {p["name"]: p for p in listed.json()["pipelines"]}
    hourly = by_name["hourly_events"]
    assert hourly["schedule"] == "0 * * * *" and hourly["timezone"] == "Europe/Paris"
    assert hourly["next_fire"] is not None and hourly["paused"] is False
    assert (hourly["max_active_runs"], hourly["active_runs"], hourly["retries"]) == (1, 0, 2)
    assert by_name["demo"]["schedule"] is None and by_name["demo"]["next_fire"] is None
    gateway = api.token("gateway:edge")
    assert api.client.get("/api/v1/pipelines", headers=gateway).status_code == 403
    assert api.client.get("/api/v1/pipelines/nope", headers=read).status_code == 404


def test_pause_and_resume_need_an_operator_and_are_stored(api: Api) -> None:  # noqa: F811
    operator, read = api.token("operator"), api.token("read")
    url = "/api/v1/pipelines/hourly_events"
    assert api.client.post(f"{url}/pause", headers=read).status_code == 403
    paused = api.client.post(f"{url}/pause", headers=operator)
    assert paused.status_code == 200, paused.text
    assert paused.json()["paused"] is True and paused.json()["next_fire"] is None
    assert paused.json()["paused_by"].startswith("token:")
    assert api.store.pipeline_states(["hourly_events"])["hourly_events"].paused
    resumed = api.client.post(f"{url}/resume", headers=operator)
    assert resumed.json()["paused"] is False and resumed.json()["next_fire"] is not None
    assert api.client.post("/api/v1/pipelines/nope/pause", headers=operator).status_code == 404


def test_backfill_creates_one_run_per_interval_once(api: Api) -> None:  # noqa: F811
    operator = api.token("operator")
    url = "/api/v1/pipelines/hourly_events/backfill"
    body = {"from": "2026-02-01T00:00:00+01:00", "to": "2026-02-01T06:00:00+01:00"}
    done = api.client.post(url, json=body, headers=operator)
    assert done.status_code == 201, done.text
    assert (done.json()["intervals"], done.json()["created"]) == (6, 6)
    run = done.json()["runs"][0]
    assert run["trigger"] == "backfill" and run["triggered_by"].startswith("token:")
    assert run["interval_start"] == "2026-01-31T23:00:00+00:00"
    again = api.client.post(url, json=body, headers=operator)
    assert (again.json()["created"], again.json()["existing"]) == (0, 6)
    assert len(api.store.list_runs(pipeline="hourly_events")) == 6


def test_bad_backfills_are_4xx_naming_the_field_and_create_nothing(api: Api) -> None:  # noqa: F811
    operator = api.token("operator")
    cases = [
        (
            "hourly_events",
            {"from": "2026-02-02T00:00:00Z", "to": "2026-02-01T00:00:00Z"},
            422,
            "must be after from",
        ),
        (
            "hourly_events",
            {"from": "2026-02-01T00:10:00Z", "to": "2026-02-01T00:50:00Z"},
            422,
            "no complete interval",
        ),
        (
            "hourly_events",
            {"from": "2000-01-01T00:00:00Z", "to": "2026-01-01T00:00:00Z"},
            422,
            "more than 1,000",
        ),
        (
            "hourly_events",
            {"from": "9999-12-31T00:00:00Z", "to": "9999-12-31T23:59:59Z"},
            422,
            "outside the dates",
        ),
        ("hourly_events", {"from": "yesterday", "to": "2026-01-01T00:00:00Z"}, 422, "from"),
        ("hourly_events", {"from": "2026-01-01T00:00:00Z"}, 422, "to"),
        (
            "demo",
            {"from": "2026-01-01T00:00:00Z", "to": "2026-01-02T00:00:00Z"},
            422,
            "has no schedule",
        ),
        (
            "nope",
            {"from": "2026-01-01T00:00:00Z", "to": "2026-01-02T00:00:00Z"},
            404,
            "unknown pipeline",
        ),
    ]
    for name, body, status, fragment in cases:
        response = api.client.post(
            f"/api/v1/pipelines/{name}/backfill", json=body, headers=operator
        )
        assert response.status_code == status, (body, response.text)
        assert fragment in response.text, response.text
    assert api.store.list_runs() == []


def test_force_cancel_ends_a_running_run_now(api: Api) -> None:  # noqa: F811
    operator = api.token("operator")
    run = api.store.create_run("demo")
    lease = api.store.acquire(run.id, "w1", 30)
    assert lease is not None
    polite = api.client.post(f"/api/v1/action-runs/{run.id}/cancel", headers=operator)
    assert polite.json()["status"] == "running" and polite.json()["cancel_requested"]
    forced = api.client.post(f"/api/v1/action-runs/{run.id}/cancel?force=true", headers=operator)
    assert forced.status_code == 200, forced.text
    assert forced.json()["status"] == "cancelled"
    assert "by force" in forced.json()["error_summary"]
    stored = api.store.get_run(run.id)
    assert stored.status is Status.CANCELLED and stored.lease_epoch > 1  # the fence moved on
    entry = [e for e in api.store.entries(run.id) if e.event == "run_cancelled"][-1]
    assert entry.data["forced"] is True
    bad = api.client.post(f"/api/v1/action-runs/{run.id}/cancel?force=maybe", headers=operator)
    assert bad.status_code == 400
