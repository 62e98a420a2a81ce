"""Unattended pipelines with real ``celery -A worker beat`` and workers: schedules fired
exactly once by two beats, catch-up after beat was down, a backfill that loads each interval
once, max_active_runs under four workers, retries from the checkpoint, stalls and forced
cancels."""

from __future__ import annotations

import itertools
import json
import secrets
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest

from tests.acceptance.harness import QUARRY, Cluster, wait_for
from tests.crm_api import CrmServer
from tests.extract.conftest import load_orders
from worker.models import Entry, Run, Status

pytestmark = pytest.mark.acceptance

DEMO = 'source = { type = "demo", seed = 3, profiles = 5, events_per_slice = 2, lists = 1, page_size = 5 }'
ENDED = (Status.SUCCEEDED, Status.FAILED, Status.CANCELLED)


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest) -> dict[str, str]:
    """The store and broker of a cluster: embedded, or PostgreSQL and Redis."""
    if request.param == "sqlite":
        return {"database_url": "", "broker_url": ""}
    return {
        "database_url": request.getfixturevalue("pg_url"),
        "broker_url": request.getfixturevalue("redis_url"),
    }


def make_cluster(tmp_path: Path, pipelines: str, **backend: str) -> Cluster:
    cluster = Cluster(tmp_path, **backend)
    cluster.pipelines_file.write_text(pipelines)
    return cluster


def conninfo(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://")


def fires(cluster: Cluster, pipeline: str) -> list[datetime]:
    runs = cluster.store.list_runs(pipeline=pipeline, limit=1000)
    return sorted(r.fire_time for r in runs if r.fire_time is not None)


def first(entries: list[Entry], event: str) -> Entry:
    return next(e for e in entries if e.event == event)


def quarry(cluster: Cluster, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(QUARRY), *argv],
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_two_beats_fire_every_time_once_and_none_is_skipped(
    tmp_path: Path, backend: dict[str, str]
) -> None:
    """Two beat processes tick the same every-two-seconds schedule: each fire time gets one
    run, one after another with none missing, each covering the two seconds before it."""
    cluster = make_cluster(
        tmp_path,
        f'[pipelines.tick]\nschedule = "*/2 * * * * *"\ncatchup = true\nmax_active_runs = 10\n'
        f'destination = {{ type = "null" }}\n{DEMO}\nresources = [{{ name = "profiles" }}]\n',
        **backend,
    )
    try:
        cluster.worker("a", concurrency=2)
        one, two = cluster.beat("one"), cluster.beat("two")
        wait_for(lambda: len(fires(cluster, "tick")) >= 6, "six fires", 60)
        one.stop()
        two.stop()
        runs = cluster.store.list_runs(pipeline="tick", limit=1000)
        for run in runs:
            cluster.wait_status(run.id, *ENDED)
        times = fires(cluster, "tick")
        assert len(times) == len(runs) == len(set(times))
        assert all(b - a == timedelta(seconds=2) for a, b in itertools.pairwise(times))
        for run in cluster.store.list_runs(pipeline="tick", limit=1000):
            assert run.status is Status.SUCCEEDED, run.error_summary
            assert run.trigger == "schedule"
            assert run.interval_end == run.fire_time
            assert run.fire_time - run.interval_start == timedelta(seconds=2)  # type: ignore[operator]
            acquired = first(cluster.entries(run.id), "lease_acquired")
            assert acquired.data["interval_end"] == run.fire_time.isoformat()  # type: ignore[union-attr]
    finally:
        cluster.close()


def test_missed_intervals_after_beat_was_down(tmp_path: Path) -> None:
    """Beat stopped for several intervals, then started: ``catchup = false`` makes one run
    for the latest missed interval, ``catchup = true`` one per missed interval."""
    pipelines = "".join(
        f'[pipelines.{name}]\nschedule = "*/2 * * * * *"\ncatchup = {flag}\nmax_active_runs = 10\n'
        f'destination = {{ type = "null" }}\n{DEMO}\nresources = [{{ name = "profiles" }}]\n'
        for name, flag in (("latest", "false"), ("every", "true"))
    )
    cluster = make_cluster(tmp_path, pipelines)
    try:
        cluster.worker("a", concurrency=2)
        beat = cluster.beat("one")
        wait_for(
            lambda: fires(cluster, "latest") and fires(cluster, "every"), "a first fire each", 60
        )
        beat.stop()
        before = {name: fires(cluster, name)[-1] for name in ("latest", "every")}
        time.sleep(9)  # four or five intervals go by with no beat
        restarted = datetime.now(UTC)
        beat = cluster.beat("two")
        wait_for(
            lambda: len(fires(cluster, "every")) >= len(fires(cluster, "latest")) + 3,
            "catch-up",
            60,
        )
        beat.stop()
        latest = [t for t in fires(cluster, "latest") if t > before["latest"]]
        every = [t for t in fires(cluster, "every") if t > before["every"]]
        missed = [t for t in every if t <= restarted]
        assert len(missed) >= 4
        # Every missed interval got its run, oldest first, with no gap.
        assert every[0] == before["every"] + timedelta(seconds=2)
        assert all(b - a == timedelta(seconds=2) for a, b in itertools.pairwise(every))
        # Only the latest missed interval got one; the ones before it were skipped.
        assert latest[0] > before["latest"] + timedelta(seconds=4)
        assert latest[0] >= missed[-1]
    finally:
        cluster.close()


def test_max_active_runs_one_runs_four_simultaneous_runs_one_after_another(
    tmp_path: Path, backend: dict[str, str]
) -> None:
    """Four workers receive four runs of a ``max_active_runs = 1`` pipeline at the same
    instant: they run one after another (their lease times never overlap), the waiting ones
    say which run they wait for, and each starts when the one before it ends."""
    cluster = make_cluster(
        tmp_path,
        '[pipelines.one]\nsource = { type = "demo", seed = 5, profiles = 40, events_per_slice = 10,'
        ' lists = 2, page_size = 10, page_latency_ms = 40 }\nresources = [{ name = "profiles" },'
        ' { name = "lists" }]\n',
        **backend,
    )
    try:
        for name in "abcd":
            cluster.worker(name)
        wait_for(lambda: all("ready" in w.log() for w in cluster.workers), "workers up", 60)
        runs = [cluster.store.create_run("one") for _ in range(4)]
        for run in runs:
            cluster.publish(run.id)
        ended = [cluster.wait_status(r.id, *ENDED, timeout=120) for r in runs]
        assert {r.status for r in ended} == {Status.SUCCEEDED}
        spans = []
        for run in runs:
            entries = cluster.entries(run.id)
            spans.append(
                (
                    first(entries, "lease_acquired").occurred_at,
                    first(entries, "run_completed").occurred_at,
                )
            )
        spans.sort()
        assert all(prev_end <= start for (_, prev_end), (start, _) in itertools.pairwise(spans))
        # The same from the run records: each lease taken after the one before was released.
        held = sorted((r.started_at, r.finished_at) for r in ended)
        assert all(None not in span for span in held)
        assert all(prev_end <= start for (_, prev_end), (start, _) in itertools.pairwise(held))  # type: ignore[operator]
        waited = [r for r in runs if any(e.event == "run_waiting" for e in cluster.entries(r.id))]
        assert len(waited) >= 1
        for run in waited:
            entry = first(cluster.entries(run.id), "run_waiting")
            assert entry.data["waiting_for"] in {r.id for r in runs} - {run.id}
            assert "max_active_runs" in entry.message
    finally:
        cluster.close()


@pytest.fixture
def pg_cluster(tmp_path: Path, pg_url: str, redis_url: str) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path, database_url=pg_url, broker_url=redis_url)
    cluster.beat()
    yield cluster
    cluster.close()


def test_an_incremental_pipeline_triggered_twice_at_once_loads_each_row_once(
    pg_cluster: Cluster, pg_url: str
) -> None:
    """Two runs of an incremental pipeline published together: the second waits for the first
    and reads from the high-water mark the first committed, so no row is loaded twice."""
    load_orders(pg_url, 2000)
    schema = f"inc_{secrets.token_hex(4)}"
    with pg_cluster.pipelines_file.open("a") as fh:
        fh.write(
            f'\n[pipelines.incr]\nsource = {{ type = "sql", url = "{pg_url}", page_size = 200 }}\n'
            f'resources = [{{ name = "orders", options = {{ table = "src_orders", cursor_column = "id" }} }}]\n'
            f'destination = {{ type = "sql", url = "{pg_url}", schema = "{schema}" }}\n'
        )
    pg_cluster.worker("a")
    pg_cluster.worker("b")
    runs = [pg_cluster.store.create_run("incr") for _ in range(2)]
    for run in runs:
        pg_cluster.publish(run.id)
    for run in runs:
        assert pg_cluster.wait_status(run.id, *ENDED).status is Status.SUCCEEDED
    with psycopg.connect(conninfo(pg_url), autocommit=True) as conn:
        total, distinct = conn.execute(
            f'SELECT count(*), count(DISTINCT id) FROM "{schema}".orders'
        ).fetchone()  # type: ignore[misc]
        conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
    assert (total, distinct) == (2000, 2000)


def test_a_backfill_of_24_hourly_intervals_loads_each_row_once(
    pg_cluster: Cluster, pg_url: str
) -> None:
    """A backfill over 24 hourly intervals of a SQL source sliced by interval: 24 runs, the
    destination equals the source row by row; the same backfill again adds nothing."""
    day = datetime(2026, 3, 1, tzinfo=UTC)
    schema = f"bf_{secrets.token_hex(4)}"
    with psycopg.connect(conninfo(pg_url), autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS bf_events")
        conn.execute("CREATE TABLE bf_events (id int PRIMARY KEY, at timestamptz, value text)")
        conn.execute(
            "INSERT INTO bf_events SELECT g, %s::timestamptz + g * interval '71 seconds',"
            " md5(g::text) FROM generate_series(0, 1400) g",
            (day - timedelta(hours=1),),
        )
    with pg_cluster.pipelines_file.open("a") as fh:
        fh.write(
            f'\n[pipelines.bf]\nschedule = "@hourly"\nmax_active_runs = 4\n'
            f'source = {{ type = "sql", url = "{pg_url}" }}\n'
            f'resources = [{{ name = "events", slices = {{ window = "interval", step = "20m" }},'
            f' options = {{ table = "bf_events", slice_column = "at" }} }}]\n'
            f'destination = {{ type = "sql", url = "{pg_url}", schema = "{schema}" }}\n'
        )
    pg_cluster.worker("a")
    pg_cluster.worker("b")
    window = ("--from", day.isoformat(), "--to", (day + timedelta(hours=24)).isoformat())
    done = quarry(pg_cluster, "runs", "backfill", "bf", *window, "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert (report["intervals"], report["created"], report["existing"]) == (24, 24, 0)
    runs: list[Run] = [pg_cluster.store.get_run(r["id"]) for r in report["runs"]]
    for run in runs:
        assert pg_cluster.wait_status(run.id, *ENDED, timeout=180).status is Status.SUCCEEDED
    assert sorted((r.interval_start, r.interval_end) for r in runs) == [
        (day + timedelta(hours=h), day + timedelta(hours=h + 1)) for h in range(24)
    ]
    again = quarry(pg_cluster, "runs", "backfill", "bf", *window)
    assert again.returncode == 0, again.stderr
    assert "queued 0 runs for 24 intervals of bf (24 already had one)" in again.stdout
    with psycopg.connect(conninfo(pg_url), autocommit=True) as conn:
        source = conn.execute(
            "SELECT id, at, value FROM bf_events WHERE at >= %s AND at < %s ORDER BY id",
            (day, day + timedelta(hours=24)),
        ).fetchall()
        loaded = conn.execute(f'SELECT id, at, value FROM "{schema}".events ORDER BY id').fetchall()
        conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
    assert len(source) > 1000
    assert loaded == source


def http_pipeline(crm: CrmServer, name: str, **settings: str) -> str:
    extra = "".join(f"{k} = {v}\n" for k, v in settings.items())
    return f'''
[pipelines.{name}]
{extra}
[pipelines.{name}.source]
type = "http"
base_url = "{crm.url}"
headers = {{ Authorization = "Bearer ${{CRM_TOKEN}}" }}
max_retries = 0
timeout_seconds = 60

[[pipelines.{name}.resources]]
name = "lists"
[pipelines.{name}.resources.options]
path = "/v1/lists"
records = "results"
pagination = {{ type = "page", page_param = "page", total_pages_path = "total_pages" }}

[[pipelines.{name}.resources]]
name = "contacts"
[pipelines.{name}.resources.options]
path = "/v1/contacts"
records = "data"
params = {{ limit = 100 }}
pagination = {{ type = "cursor", cursor_path = "meta.next_cursor" }}
'''


@pytest.fixture
def crm() -> Iterator[CrmServer]:
    server = CrmServer(token="crm-token-" + secrets.token_hex(4), total=300).start()
    yield server
    if server.hang_until is not None:
        server.hang_until.set()
    server.stop()


def test_a_flaky_source_is_retried_from_its_checkpoint_and_bad_credentials_are_not(
    pg_cluster: Cluster, crm: CrmServer
) -> None:
    """An API that fails twice, then answers: the run retries after its delays from its
    checkpoint (the resource done before the failure is not read again) and succeeds. A
    401 is not retried."""
    pg_cluster.env["CRM_TOKEN"] = crm.token
    with pg_cluster.pipelines_file.open("a") as fh:
        fh.write(http_pipeline(crm, "flaky", retries="3", retry_delay='"1s"'))
    # The lists resource reads fine; the contacts fail twice, then answer.
    crm.fail_path, crm.fail_first = "/v1/contacts", 2
    pg_cluster.worker("a")
    run_id = pg_cluster.trigger("flaky")
    run = pg_cluster.wait_status(run_id, *ENDED, timeout=120)
    assert run.status is Status.SUCCEEDED, run.error_summary
    entries = pg_cluster.entries(run_id)
    retries = [e for e in entries if e.event == "run_retry"]
    assert run.retries == len(retries) == 2
    assert run.attempt == run.retries + 1 and run.recoveries == 0
    assert run.attempt_reason == f"retry of attempt {run.attempt - 1}"
    assert all(e.level == "warning" and "HTTP 503" in e.message for e in retries)
    assert [e.data["resource"] for e in entries if e.event == "resource_started"].count(
        "lists"
    ) == 1
    acquired = [e for e in entries if e.event == "lease_acquired"]
    for retry, next_lease in zip(retries, acquired[1:], strict=False):
        due = datetime.fromisoformat(retry.data["not_before"])
        assert next_lease.occurred_at >= due  # not before its due time

    # Bad credentials: a 401 fails the run once, with no retry.
    pg_cluster.env["CRM_TOKEN"] = "wrong"
    for worker in pg_cluster.workers:
        if worker.name == "a":
            worker.stop()
    pg_cluster.worker("b")
    refused = pg_cluster.trigger("flaky")
    run = pg_cluster.wait_status(refused, *ENDED, timeout=60)
    assert run.status is Status.FAILED and "HTTP 401" in (run.error_summary or "")
    assert (run.attempt, run.retries) == (1, 0)
    assert not [e for e in pg_cluster.entries(refused) if e.event == "run_retry"]


def test_a_stalled_page_fails_its_slice_and_force_cancel_ends_a_hung_run(
    pg_cluster: Cluster, crm: CrmServer
) -> None:
    """A page that never comes: past ``page_timeout`` the slice fails with an error saying
    so and the run takes its retry path. A run hung in a blocking read with a long
    page_timeout is ended by ``runs cancel --force`` at once, and its worker is free
    within seconds and writes nothing more for it; one past its ``run_timeout`` fails,
    not retried."""
    pg_cluster.env["CRM_TOKEN"] = crm.token
    with pg_cluster.pipelines_file.open("a") as fh:
        fh.write(http_pipeline(crm, "stall", retries="1", retry_delay='"1s"', page_timeout='"2s"'))
        fh.write(http_pipeline(crm, "hung", page_timeout='"10m"'))
        fh.write(http_pipeline(crm, "timed", retries="2", run_timeout='"3s"', page_timeout='"10m"'))
    crm.hang_until = threading.Event()
    pg_cluster.worker("a")
    stalled = pg_cluster.trigger("stall")
    run = pg_cluster.wait_status(stalled, *ENDED, timeout=60)
    assert run.status is Status.FAILED
    assert "produced no page for 2.0s (page_timeout)" in (run.error_summary or "")
    events = [e.event for e in pg_cluster.entries(stalled)]
    assert events.count("run_retry") == 1 and events.count("run_failed") == 1

    hung = pg_cluster.trigger("hung")
    wait_for(
        lambda: any(e.event == "extraction_started" for e in pg_cluster.entries(hung)),
        "the hung run to start",
        30,
    )
    time.sleep(1)  # blocked inside the first page
    forced = quarry(pg_cluster, "runs", "cancel", "--force", hung)
    assert forced.returncode == 0, forced.stderr
    assert f"cancelled {hung} by force" in forced.stdout
    run = pg_cluster.store.get_run(hung)
    assert run.status is Status.CANCELLED and "by force" in (run.error_summary or "")
    # The worker is free again: a run it takes next completes while the API still hangs.
    after = len(pg_cluster.entries(hung))
    demo = pg_cluster.trigger("small")
    assert pg_cluster.wait_status(demo, *ENDED, timeout=60).status is Status.SUCCEEDED
    # A run past its run_timeout (its page still hanging) fails at its next check, and a
    # timeout is not retried whatever the pipeline's retries.
    timed = pg_cluster.trigger("timed")
    run = pg_cluster.wait_status(timed, *ENDED, timeout=60)
    assert run.status is Status.FAILED
    assert "the attempt ran longer than its run_timeout (3.0s)" in (run.error_summary or "")
    assert (run.attempt, run.retries) == (1, 0)
    assert "run_retry" not in [e.event for e in pg_cluster.entries(timed)]
    crm.hang_until.set()  # the abandoned read returns now: nothing of it may land
    time.sleep(2)
    assert len(pg_cluster.entries(hung)) == after
    assert pg_cluster.store.get_run(hung).status is Status.CANCELLED
