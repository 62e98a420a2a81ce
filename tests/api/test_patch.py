"""The runs PATCH contract for external runners, on the real API server."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from tests.api.test_api import Api, api, api_server  # noqa: F401 - the server fixtures
from worker.models import Status


def _patch(api: Api, run_id: str, headers: dict[str, str], **body: Any) -> Any:  # noqa: F811
    return api.client.patch(f"/api/v1/action-runs/{run_id}", json=body, headers=headers)


def test_the_documented_sequence(api: Api) -> None:  # noqa: F811
    """Trigger for a gateway, poll, claim, stream logs and telemetry, finish — camelCase and snake_case."""
    operator, east = api.token("operator"), api.token("gateway:east")
    created = api.client.post(
        "/api/v1/action-runs", json={"pipeline": "demo", "gateway": "east"}, headers=operator
    ).json()
    run_id = created["id"]
    polled = api.client.get("/api/v1/agent/runs", headers=east).json()["runs"]
    assert [r["id"] for r in polled] == [run_id]
    claimed = _patch(api, run_id, east, status="running")
    assert claimed.status_code == 200, claimed.text
    epoch = claimed.json()["leaseEpoch"]
    assert claimed.json()["status"] == "running"
    assert (
        _patch(
            api,
            run_id,
            east,
            leaseEpoch=epoch,
            appendLog={"level": "warn", "message": "slow upstream, password=hunter2"},
        ).status_code
        == 200
    )
    assert (
        _patch(
            api,
            run_id,
            east,
            lease_epoch=epoch,
            telemetry_summary={"rowsLoaded": 10, "progress": 40},
        ).status_code
        == 200
    )
    assert (
        _patch(
            api,
            run_id,
            east,
            leaseEpoch=epoch,
            telemetrySummary={"progress": 100},
            appendTelemetrySample={"rowsLoaded": 10},
        ).status_code
        == 200
    )
    finished = datetime.now(UTC).replace(microsecond=0)
    done = _patch(
        api, run_id, east, leaseEpoch=epoch, status="succeeded", finishedAt=finished.isoformat()
    )
    assert done.status_code == 200, done.text
    run = api.store.get_run(run_id)
    assert run.status is Status.SUCCEEDED
    assert run.telemetry_summary == {"rowsLoaded": 10, "progress": 100}
    assert run.finished_at == finished
    entries = api.store.entries(run_id)
    assert [e.event for e in entries] == ["lease_acquired", "log", "run_completed"]
    assert entries[1].level.value == "warning"
    assert "hunter2" not in entries[1].message
    assert entries[1].worker_id == "gateway:east"
    assert [v for _, v in api.store.samples(run_id)] == [{"rowsLoaded": 10}]


def test_writes_are_fenced_on_the_lease_epoch(api: Api) -> None:  # noqa: F811
    """A wrong or superseded epoch is a 409 and changes nothing; no epoch at all is refused."""
    east = api.token("gateway:east")
    run = api.store.create_run("demo", gateway="east")
    epoch = _patch(api, run.id, east, status="running").json()["leaseEpoch"]
    assert _patch(api, run.id, east, appendLog={"message": "x"}).status_code == 409
    assert (
        _patch(api, run.id, east, leaseEpoch=epoch + 5, appendLog={"message": "x"}).status_code
        == 409
    )
    assert api.store.transition(
        run.id, Status.RUNNING, Status.QUEUED, expected_epoch=epoch, bump_attempt=True
    )
    stale = _patch(api, run.id, east, leaseEpoch=epoch, appendLog={"message": "late"})
    assert stale.status_code == 409
    assert "lease lost" in stale.json()["error"]["message"]
    assert "late" not in [e.message for e in api.store.entries(run.id)]


def test_illegal_and_unauthorised_patches(api: Api) -> None:  # noqa: F811
    """Transitions the state machine refuses, unknown fields, read tokens, other gateways."""
    east, west, read = api.token("gateway:east"), api.token("gateway:west"), api.token("read")
    run = api.store.create_run("demo", gateway="east")
    assert _patch(api, run.id, east, status="succeeded").status_code == 409  # queued -> succeeded
    assert _patch(api, run.id, east, bogus=1).status_code == 422
    assert _patch(api, run.id, read, status="running").status_code == 403
    assert _patch(api, run.id, west, status="running").status_code == 404
    assert api.client.get("/api/v1/agent/runs", headers=api.token("operator")).status_code == 403
    assert _patch(api, run.id, east, status="running").status_code == 200
    assert _patch(api, run.id, east, status="running").status_code == 409  # already claimed
    assert api.store.get_run(run.id).status is Status.RUNNING


def test_backfill_of_an_ended_run(api: Api) -> None:  # noqa: F811
    """After the end: replace the log and the samples, set the error summary."""
    operator = api.token("operator")
    run = api.store.create_run("demo", gateway="east")
    api.store.transition(run.id, Status.QUEUED, Status.CANCELLED)
    response = _patch(
        api,
        run.id,
        operator,
        logEntries=[{"level": "info", "message": "a"}, {"level": "error", "message": "b"}],
        telemetrySamples=[{"rows": 1}, {"rows": 2}],
        errorSummary="token=abc123secret was rejected",
    )
    assert response.status_code == 200, response.text
    assert [e.message for e in api.store.entries(run.id)] == ["a", "b"]
    assert [v for _, v in api.store.samples(run.id)] == [{"rows": 1}, {"rows": 2}]
    summary = api.store.get_run(run.id).error_summary or ""
    assert "abc123secret" not in summary
    assert _patch(api, run.id, operator, appendLog={"message": "late"}).status_code == 409
    assert _patch(api, run.id, operator, status="running").status_code == 409
