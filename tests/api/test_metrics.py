"""``/metrics`` over a real API server: every documented series, parsed as Prometheus parses it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.api.test_api import Api, api, api_server  # noqa: F401 - the server fixtures
from tests.store.test_store import entry
from worker import recovery, testing
from worker.api.metrics import StoreCollector
from worker.models import Lease, Status
from worker.settings import Settings
from worker.store import Store

#: Every family /metrics exports, by name as the parser reports it, and its type.
FAMILIES = {
    "quarry_runs": "gauge",
    "quarry_pipeline_active_runs": "gauge",
    "quarry_pipeline_queued_runs": "gauge",
    "quarry_runs_started": "counter",
    "quarry_runs_ended": "counter",
    "quarry_run_recoveries": "counter",
    "quarry_run_interruptions": "counter",
    "quarry_run_duration_seconds": "histogram",
    "quarry_queue_wait_seconds": "histogram",
    "quarry_rows_loaded": "counter",
    "quarry_bytes_loaded": "counter",
    "quarry_last_success_timestamp_seconds": "gauge",
    "quarry_pipeline_due_timestamp_seconds": "gauge",
    "quarry_log_entries": "counter",
    "quarry_log_entries_dropped": "counter",
    "quarry_stream_clients": "gauge",
}


def scrape(api: Api) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:  # noqa: F811
    """Every sample of one scrape, by name and sorted labels; the families checked first."""
    response = api.client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    assert {name: f.type for name, f in families.items()} == FAMILIES
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in families.values()
        for s in f.samples
    }


def leased(api: Api, run_id: str) -> Lease:  # noqa: F811
    lease = api.store.acquire(run_id, "w", 30)
    assert isinstance(lease, Lease)
    return lease


def test_metrics_after_a_success_a_failure_and_a_recovery(api: Api) -> None:  # noqa: F811
    """Before any run, every declared pipeline's counters exist at zero (so ``increase()``
    sees a first failure) and no histogram or last success is made up. Then a run that
    succeeded with two slices, one that failed, one recovered by the watchdog (and left
    queued), one never started: each series says so, per pipeline."""
    empty = scrape(api)
    assert empty[("quarry_runs_ended_total", (("pipeline", "demo"), ("status", "failed")))] == 0
    assert empty[("quarry_pipeline_queued_runs", (("pipeline", "hourly_events"),))] == 0
    assert not any(name.startswith("quarry_run_duration_seconds") for name, _ in empty)
    assert not any(name == "quarry_last_success_timestamp_seconds" for name, _ in empty)
    store = api.store
    ok = store.create_run("demo")
    lease = leased(api, ok.id)
    store.commit(lease, [entry(ok.id)], checkpoint={"s": 1}, loaded=(100, 2000))
    store.commit(lease, [entry(ok.id)], checkpoint={"s": 2}, loaded=(50, 1000))
    store.finish(lease, Status.SUCCEEDED, [entry(ok.id)])
    bad = store.create_run("demo")
    store.finish(leased(api, bad.id), Status.FAILED, [entry(bad.id)], error_summary="boom")
    lost = store.create_run("hourly_events")
    leased(api, lost.id)
    testing.expire_lease(store, lost.id)
    (stale,) = testing.expired_runs(store)
    decision = recovery.decide(
        stale,
        db_now=store.db_time(),
        now=datetime.now(UTC),
        max_attempts=3,
        republish_after=timedelta(hours=1),
    )
    assert recovery.act(store, decision, lambda _id: None, max_attempts=3)
    store.create_run("demo")
    samples = scrape(api)

    def value(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    assert value("quarry_runs", status="succeeded") == 1
    assert value("quarry_runs", status="failed") == 1
    assert value("quarry_runs", status="queued") == 2
    assert value("quarry_runs", status="running") == 0
    assert value("quarry_pipeline_active_runs", pipeline="hourly_events") == 1  # between attempts
    assert value("quarry_pipeline_active_runs", pipeline="demo") == 0
    assert value("quarry_pipeline_queued_runs", pipeline="demo") == 1
    assert value("quarry_pipeline_queued_runs", pipeline="hourly_events") == 0
    assert value("quarry_runs_started_total", pipeline="demo") == 2
    assert value("quarry_runs_started_total", pipeline="hourly_events") == 1
    assert value("quarry_runs_ended_total", pipeline="demo", status="succeeded") == 1
    assert value("quarry_runs_ended_total", pipeline="demo", status="failed") == 1
    assert value("quarry_runs_ended_total", pipeline="demo", status="cancelled") == 0
    assert value("quarry_runs_ended_total", pipeline="hourly_events", status="failed") == 0
    assert value("quarry_run_recoveries_total", pipeline="hourly_events", kind="expired_lease") == 1
    assert value("quarry_run_recoveries_total", pipeline="demo", kind="expired_lease") == 0
    assert (
        value("quarry_run_interruptions_total", pipeline="hourly_events", kind="worker_lost") == 1
    )
    assert value("quarry_rows_loaded_total", pipeline="demo") == 150
    assert value("quarry_bytes_loaded_total", pipeline="demo") == 3000
    assert value("quarry_rows_loaded_total", pipeline="hourly_events") == 0
    assert value("quarry_log_entries_dropped_total", pipeline="demo") == 0
    last = value("quarry_last_success_timestamp_seconds", pipeline="demo")
    assert abs(last - store.get_run(ok.id).finished_at.timestamp()) < 1  # type: ignore[union-attr]
    assert (
        "quarry_last_success_timestamp_seconds",
        (("pipeline", "hourly_events"),),
    ) not in samples
    for status in ("succeeded", "failed"):
        labels = {"pipeline": "demo", "status": status}
        assert value("quarry_run_duration_seconds_count", **labels) == 1
        assert value("quarry_run_duration_seconds_bucket", **labels, le="+Inf") == 1
        assert value("quarry_run_duration_seconds_sum", **labels) >= 0
    assert value("quarry_queue_wait_seconds_count", pipeline="demo") == 2
    assert value("quarry_queue_wait_seconds_bucket", pipeline="demo", le="1.0") in {0, 1, 2}
    assert value("quarry_queue_wait_seconds_bucket", pipeline="demo", le="+Inf") == 2
    written = [e.id for run in (ok, bad, lost) for e in store.entries(run.id)]
    assert value("quarry_log_entries_total") == max(written)
    assert value("quarry_stream_clients") == 0
    assert not any("run_" in dict(labels).get("pipeline", "") for _, labels in samples)


def test_a_scheduled_pipeline_says_which_fire_time_should_have_succeeded(
    sqlite_url: str, tmp_path: Path
) -> None:
    """``quarry_pipeline_due_timestamp_seconds``: the fire before the newest, for a scheduled
    pipeline whose clock started before it; none while paused or for a manual pipeline."""
    (tmp_path / "pipelines.toml").write_text(
        "".join(
            f'[pipelines.{name}]\nsource = {{ type = "demo" }}\n'
            f'resources = [{{ name = "profiles" }}]\n{extra}\n'
            for name, extra in (
                ("hourly", 'schedule = "@hourly"'),
                ("paused", 'schedule = "@hourly"'),
                ("fresh", 'schedule = "0 3 * * *"'),
                ("manual", ""),
            )
        )
    )
    store = Store(sqlite_url)
    now = datetime.now(UTC)
    store.start_schedules(
        [("hourly", "@hourly UTC"), ("paused", "@hourly UTC")], now - timedelta(days=2)
    )
    store.start_schedule("fresh", "0 3 * * * UTC", now)  # its clock started after that fire
    store.set_paused("paused", True, "cli:ann")
    collector = StoreCollector(
        store, Settings(database_url=sqlite_url, pipelines_file=tmp_path / "pipelines.toml")
    )
    due = {
        sample.labels["pipeline"]: sample.value
        for family in collector.collect()
        if family.name == "quarry_pipeline_due_timestamp_seconds"
        for sample in family.samples
    }
    expected = [
        {
            "hourly": (
                moment.replace(minute=0, second=0, microsecond=0) - timedelta(hours=1)
            ).timestamp()
        }
        for moment in (now, datetime.now(UTC))  # the hour may turn during the scrape
    ]
    assert due in expected
    store.close()
