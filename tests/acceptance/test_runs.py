"""Runs on real ``celery -A worker worker`` processes: embedded default, and PostgreSQL with Redis
or RabbitMQ."""

from __future__ import annotations

import collections
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from scheduler import watchdog
from tests.acceptance.harness import Cluster, expected_rows, temp_files, wait_for, written_rows
from worker import testing
from worker.models import Status

pytestmark = pytest.mark.acceptance

SMALL_SLICES = 12
SLOW_SLICES = 30


@pytest.fixture(params=["embedded", "redis_pg"])
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cluster]:
    """A cluster on each backend: embedded, PostgreSQL with Redis, and for the tests marked
    :data:`WITH_RABBITMQ`, PostgreSQL with RabbitMQ."""
    if request.param == "embedded":
        c = Cluster(tmp_path)
    else:
        broker = request.param.removesuffix("_pg")
        c = Cluster(
            tmp_path,
            database_url=request.getfixturevalue("pg_url"),
            broker_url=request.getfixturevalue(f"{broker}_url"),
        )
    yield c
    c.close()


#: The run lifecycle and duplicate delivery run on RabbitMQ too (its stops and crashes are
#: in test_shutdown.py).
WITH_RABBITMQ = pytest.mark.parametrize(
    "cluster", ["embedded", "redis_pg", "amqp_pg"], indirect=True
)


@pytest.fixture
def pg_cluster(tmp_path: Path, pg_url: str, redis_url: str) -> Iterator[Cluster]:
    """A cluster on Redis + PostgreSQL only."""
    c = Cluster(tmp_path, database_url=pg_url, broker_url=redis_url)
    yield c
    c.close()


def events_of(cluster: Cluster, run_id: str) -> list[str]:
    """The run's event names in order, heartbeats left out."""
    return [e.event for e in cluster.entries(run_id) if e.event != "heartbeat"]


@WITH_RABBITMQ
def test_run_completes_with_the_full_event_sequence(cluster: Cluster) -> None:
    """A run emits every lifecycle event in order and writes every slice's rows exactly once."""
    cluster.worker("a")
    run_id = cluster.trigger("small")
    run = cluster.wait_status(run_id, Status.SUCCEEDED, Status.FAILED)
    assert run.status is Status.SUCCEEDED, run.error_summary
    assert events_of(cluster, run_id) == [
        "lease_acquired",
        "extraction_started",
        "resource_started",
        "resource_completed",
        "resource_started",
        *["slice_started", "slice_completed"] * SMALL_SLICES,
        "resource_completed",
        "resource_started",
        "resource_completed",
        "extraction_completed",
        "run_completed",
    ]
    entries = cluster.entries(run_id)
    assert [e.id for e in entries] == sorted(e.id for e in entries)
    started = [e for e in entries if e.event == "resource_started"]
    assert [
        (e.data["resource"], e.data["completed_count"], e.data["total_count"]) for e in started
    ] == [
        ("profiles", 0, 3),
        ("events", 1, 3),
        ("lists", 2, 3),
    ]
    assert started[0].message == "Extracting profiles (1/3)"
    first_slice = next(e for e in entries if e.event == "slice_started")
    assert first_slice.message == f"Slice 1/{SMALL_SLICES} for events"
    completed = [e for e in entries if e.event == "resource_completed"]
    assert completed[0].message == "Completed profiles: 300 rows, 1 file"
    assert {"rows", "files", "duration_seconds"} <= completed[0].data.keys()
    assert all(e.worker_id == "a" and e.attempt == 1 for e in entries)
    assert entries[-1].message.startswith("Run completed successfully in ")
    assert written_rows(cluster, "small", run_id) == expected_rows(cluster, "small")
    assert temp_files(cluster) == []
    assert run.telemetry_summary["progress"] == 100.0
    assert run.telemetry_summary["rows_loaded"] == 300 + 5 + sum(
        len(v) for k, v in expected_rows(cluster, "small").items() if k.startswith("events/")
    )


@WITH_RABBITMQ
def test_run_published_twice_executes_once(cluster: Cluster) -> None:
    """Two deliveries to two workers: one lease epoch commits, one set of files, one skip."""
    a, b = cluster.worker("a"), cluster.worker("b")
    run = cluster.store.create_run("slow", {"page_latency_ms": 20})
    cluster.publish(run.id)
    cluster.publish(run.id)
    done = cluster.wait_status(run.id, Status.SUCCEEDED, Status.FAILED)
    assert done.status is Status.SUCCEEDED
    assert done.lease_epoch == 1
    events = events_of(cluster, run.id)
    assert events.count("lease_acquired") == 1
    assert events.count("run_completed") == 1
    assert collections.Counter(
        e.data.get("slice") for e in cluster.entries(run.id) if e.event == "slice_completed"
    ) == {i: 1 for i in range(1, SLOW_SLICES + 1)}
    assert written_rows(cluster, "slow", run.id) == expected_rows(cluster, "slow")
    wait_for(
        lambda: "lease_not_acquired" in a.log() + b.log(), "the duplicate delivery to be skipped"
    )


def test_source_failure_ends_in_run_failed_scrubbed(cluster: Cluster) -> None:
    """A source raising mid-slice fails the run with a scrubbed summary and no half-written slice."""
    cluster.worker("a")
    secret = "pw-canary-5f1e"
    run_id = cluster.trigger(
        "small",
        fail_at="events:3:2",
        fail_message=f"upstream 502 from https://user:{secret}@api.example.com/v1",
    )
    run = cluster.wait_status(run_id, Status.FAILED, Status.SUCCEEDED)
    assert run.status is Status.FAILED
    assert run.error_summary is not None
    assert "upstream 502" in run.error_summary
    assert secret not in run.error_summary
    entries = cluster.entries(run_id)
    assert [e.event for e in entries][-2:] == ["resource_failed", "run_failed"]
    assert entries[-1].level.value == "error"
    assert all(secret not in (e.message + str(e.data)) for e in entries)
    written = written_rows(cluster, "small", run_id)
    expected = expected_rows(cluster, "small")
    assert sorted(written) == [
        "events/events-00001.jsonl.gz",
        "events/events-00002.jsonl.gz",
        "profiles/profiles.jsonl.gz",
    ]
    assert all(written[k] == expected[k] for k in written)
    assert temp_files(cluster) == []
    assert run.checkpoint["resources"]["events"]["next_slice"] == 3


def test_run_restarted_from_checkpoint_skips_what_was_done(cluster: Cluster) -> None:
    """A worker killed mid-run: the recovered run resumes at the next slice, redoing no committed one."""
    a = cluster.worker("a")
    run_id = cluster.trigger("slow")
    wait_for(lambda: cluster.slices_done(run_id) >= 4, "four committed slices")
    a.signal_group(signal.SIGKILL)
    a.proc.wait(timeout=10)
    committed = cluster.store.get_run(run_id).checkpoint["resources"]["events"]["next_slice"] - 1
    wait_for(lambda: testing.expired_runs(cluster.store), "the dead worker's lease to expire")
    recovered = watchdog.sweep(cluster.store, cluster.publish_resumed, max_attempts=3)
    assert [d.run.id for d in recovered] == [run_id]
    cluster.worker("b")
    run = cluster.wait_status(run_id, Status.SUCCEEDED, Status.FAILED)
    assert run.status is Status.SUCCEEDED
    assert run.attempt == 2
    assert (run.recoveries, run.retries) == (1, 0)
    assert (run.attempt_reason or "").startswith("recovery of attempt 1 (lease of a expired")
    entries = cluster.entries(run_id)
    starts = [e for e in entries if e.event == "resource_started"]
    assert [e.data["resource"] for e in starts] == ["profiles", "events", "events", "lists"]
    assert starts[2].data["resume_from_slice"] == committed + 1
    assert starts[2].worker_id == "b"
    slices = collections.Counter(e.data["slice"] for e in entries if e.event == "slice_completed")
    assert slices == {i: 1 for i in range(1, SLOW_SLICES + 1)}
    assert "watchdog_recovery" in [e.event for e in entries]
    assert written_rows(cluster, "slow", run_id) == expected_rows(cluster, "slow")
    assert temp_files(cluster) == []


def test_worker_whose_lease_was_taken_over_writes_nothing(pg_cluster: Cluster) -> None:
    """A frozen worker resumed after a takeover writes no entry, checkpoint or file."""
    cluster = pg_cluster
    a = cluster.worker("a")
    run_id = cluster.trigger("slow")
    wait_for(lambda: cluster.slices_done(run_id) >= 3, "three committed slices")
    a.signal_group(signal.SIGSTOP)
    try:
        wait_for(lambda: testing.expired_runs(cluster.store), "the frozen worker's lease to expire")
        assert watchdog.sweep(cluster.store, cluster.publish_resumed, max_attempts=3)
        takeover = max(e.id for e in cluster.entries(run_id))
        cluster.worker("b")
        run = cluster.wait_status(run_id, Status.SUCCEEDED, Status.FAILED)
        assert run.status is Status.SUCCEEDED
        files_before = written_rows(cluster, "slow", run_id)
    finally:
        a.signal_group(signal.SIGCONT)
    wait_for(lambda: "lease_lost" in a.log(), "the zombie to notice its lease is gone")
    late = [e for e in cluster.entries(run_id) if e.worker_id == "a" and e.id > takeover]
    assert late == []
    after = cluster.store.get_run(run_id)
    assert after.status is Status.SUCCEEDED
    assert after.checkpoint == run.checkpoint
    assert written_rows(cluster, "slow", run_id) == files_before == expected_rows(cluster, "slow")
    assert temp_files(cluster) == []


def test_worker_with_unreachable_store_exits_with_a_clear_line(tmp_path: Path) -> None:
    """A worker that cannot reach its store refuses to start, names the store, hides the password."""
    c = Cluster(tmp_path)
    try:
        env = {
            **c.env,
            "QUARRY_DATABASE_URL": "postgresql+psycopg://quarry:pw-canary-31@127.0.0.1:1/x",
        }
        c.env = env
        w = c.worker("a")
        assert w.proc.wait(timeout=60) == 1
        log = w.log()
        assert "cannot use the store at postgresql+psycopg://quarry:[REDACTED]@127.0.0.1:1/x" in log
        assert "pw-canary-31" not in log
    finally:
        c.close()
