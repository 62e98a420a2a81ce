"""Workers stopped every way they get stopped, on Redis + PostgreSQL: real processes, real signals."""

from __future__ import annotations

import collections
import os
import secrets
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest

from scheduler import watchdog
from tests.acceptance.harness import (
    Cluster,
    WorkerProcess,
    expected_rows,
    free_port,
    lease_recoveries,
    temp_files,
    wait_for,
    written_rows,
)
from tests.conftest import require
from worker import control
from worker.errors import IllegalTransition
from worker.models import Entry, Status

pytestmark = pytest.mark.acceptance

SLOW_SLICES = 30


@pytest.fixture
def cluster(request: pytest.FixtureRequest, tmp_path: Path, pg_url: str) -> Iterator[Cluster]:
    """A PostgreSQL cluster with a beat running the watchdog every second, on Redis (or on
    the broker a test names through :data:`BOTH_BROKERS`)."""
    broker = getattr(request, "param", "redis")
    c = Cluster(tmp_path, database_url=pg_url, broker_url=request.getfixturevalue(f"{broker}_url"))
    c.beat()
    yield c
    c.close()


#: The lifecycle under every stop and crash runs on RabbitMQ as well as Redis.
BOTH_BROKERS = pytest.mark.parametrize("cluster", ["redis", "amqp"], indirect=True)


def slice_counts(entries: list[Entry]) -> collections.Counter[int]:
    """How many times each slice was completed."""
    return collections.Counter(e.data["slice"] for e in entries if e.event == "slice_completed")


def assert_exactly_once(cluster: Cluster, run_id: str) -> list[Entry]:
    """The run succeeded with every slice completed once and every file written once, intact."""
    run = cluster.wait_status(run_id, Status.SUCCEEDED, Status.FAILED, Status.CANCELLED)
    assert run.status is Status.SUCCEEDED, run.error_summary
    entries = cluster.entries(run_id)
    assert slice_counts(entries) == {i: 1 for i in range(1, SLOW_SLICES + 1)}
    assert written_rows(cluster, "slow", run_id) == expected_rows(cluster, "slow")
    assert temp_files(cluster) == []
    return entries


def interrupted_then_resumed(entries: list[Entry], stopped: str) -> tuple[Entry, Entry]:
    """The run_interrupted entry of the stopped worker and the lease_acquired that resumed it."""
    interrupted = [e for e in entries if e.event == "run_interrupted"]
    assert len(interrupted) == 1, [e.event for e in entries]
    stop = interrupted[0]
    assert stop.worker_id == stopped
    assert stop.level.value == "warning"
    assert stop.data["checkpoint"]["resource"] == "events"
    after = [e for e in entries if e.id > stop.id]
    assert after[0].event == "watchdog_fast_recovery"
    resumed = next(e for e in after if e.event == "lease_acquired")
    assert resumed.attempt == stop.attempt  # a graceful stop is not a retry
    # Nothing from the stopped attempt after its run_interrupted.
    assert not [
        e
        for e in after
        if e.worker_id == stopped and e.attempt == stop.attempt and e.id < resumed.id
    ]
    return stop, resumed


def start_slow_run(cluster: Cluster, worker: WorkerProcess, slices: int = 3) -> str:
    """Trigger the slow pipeline and wait until ``worker`` has committed some slices."""
    run_id = cluster.trigger("slow")
    wait_for(lambda: cluster.slices_done(run_id) >= slices, f"{slices} committed slices")
    assert cluster.store.get_run(run_id).lease_owner == worker.name
    return run_id


@BOTH_BROKERS
@pytest.mark.parametrize("delivery", ["main", "group"])
def test_sigterm_stops_at_a_safe_point_and_resumes_elsewhere(
    cluster: Cluster, delivery: str
) -> None:
    """SIGTERM to the main process or the whole group: checkpoint, run_interrupted, exit, resume on b."""
    a = cluster.worker("a")
    run_id = start_slow_run(cluster, a)
    b = cluster.worker("b")
    if delivery == "main":
        a.proc.send_signal(signal.SIGTERM)
    else:
        a.signal_group(signal.SIGTERM)
    assert a.proc.wait(timeout=30) == 0  # exited on its own, long before its run would have ended
    entries = assert_exactly_once(cluster, run_id)
    _, resumed = interrupted_then_resumed(entries, "a")
    assert resumed.worker_id == "b"
    assert b.proc.poll() is None


@BOTH_BROKERS
def test_sigterm_to_one_child_interrupts_only_its_run(cluster: Cluster) -> None:
    """SIGTERM to a pool child: its run stops at a safe point; the worker lives on and resumes it."""
    a = cluster.worker("a")
    run_id = start_slow_run(cluster, a)
    (child,) = a.children()
    os.kill(child, signal.SIGTERM)
    entries = assert_exactly_once(cluster, run_id)
    _, resumed = interrupted_then_resumed(entries, "a")
    assert resumed.worker_id == "a"
    assert a.proc.poll() is None


@BOTH_BROKERS
@pytest.mark.parametrize("target", ["child", "worker"])
def test_sigkill_recovers_the_run_once(cluster: Cluster, target: str) -> None:
    """SIGKILL of a child (its worker re-queues the run at once) or of the whole worker (the
    watchdog, at lease expiry): one recovery, resume from the checkpoint, no duplicate."""
    if target == "child":
        # The worker must be the one that recovers it: a lease long enough that the watchdog
        # cannot win the race on a loaded machine (a 3 s lease expired first once in CI).
        cluster.env = {**cluster.env, "QUARRY_LEASE_TTL_SECONDS": "15"}
    a = cluster.worker("a")
    run_id = start_slow_run(cluster, a)
    if target == "child":
        (child,) = a.children()
        os.kill(child, signal.SIGKILL)
    else:
        cluster.worker("b")  # ready before the kill, as in a deploy with spare capacity
        a.signal_group(signal.SIGKILL)
    entries = assert_exactly_once(cluster, run_id)
    recoveries = lease_recoveries(entries)
    assert len(recoveries) == 1
    assert recoveries[0].data["next_attempt"] == 2
    # Who recovered it: the worker that saw its child die, or the watchdog that saw the lease
    # expire (the same transition, told apart by its reason and its count).
    reason = recoveries[0].data["reason"]
    if target == "child":
        assert reason == "pool process of a died (signal 9 (SIGKILL))", reason
        assert "re-queued at once" in a.log()
    else:
        assert reason.startswith("lease of a expired"), reason
    kind = "lost_process" if target == "child" else "expired_lease"
    counted = [
        (labels, value)
        for _, name, labels, value in cluster.store.metrics_snapshot().counters
        if name == "run_recoveries" and labels != "kind=republish"  # as above: not about it
    ]
    assert counted == [(f"kind={kind}", 1.0)], counted
    assert cluster.store.get_run(run_id).attempt == 2
    assert "run_interrupted" not in [e.event for e in entries]


@BOTH_BROKERS
def test_frozen_worker_is_fenced_after_takeover(cluster: Cluster) -> None:
    """SIGSTOP past the lease, takeover by the watchdog and b, SIGCONT: a writes nothing more."""
    a = cluster.worker("a")
    run_id = start_slow_run(cluster, a)
    a.signal_group(signal.SIGSTOP)
    try:
        cluster.worker("b")
        wait_for(
            lambda: any(
                e.event == "lease_acquired" and e.worker_id == "b" for e in cluster.entries(run_id)
            ),
            "b to take the run over",
        )
        takeover = lease_recoveries(cluster.entries(run_id))[0].id
    finally:
        a.signal_group(signal.SIGCONT)
    entries = assert_exactly_once(cluster, run_id)
    wait_for(lambda: "lease_lost" in a.log(), "the zombie to notice its lease is gone")
    assert [e for e in cluster.entries(run_id) if e.worker_id == "a" and e.id > takeover] == []
    assert written_rows(cluster, "slow", run_id) == expected_rows(cluster, "slow")
    assert len(entries) == len(cluster.entries(run_id))


def test_two_watchdogs_recover_each_stale_epoch_once(cluster: Cluster) -> None:
    """A second beat and eight concurrent sweeps: exactly one recovery per stale lease epoch."""
    cluster.beat("beat2")
    runs = [cluster.store.create_run("slow") for _ in range(3)]
    for run in runs:
        assert cluster.store.acquire(run.id, "ghost", 1) is not None
    time.sleep(1.5)  # the ghost holder never renews

    def sweep() -> None:
        watchdog.sweep(
            cluster.store,
            cluster.publish_resumed,
            max_attempts=3,
            republish_after=timedelta(hours=1),
        )

    threads = [threading.Thread(target=sweep) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    cluster.worker("a")
    for run in runs:
        cluster.wait_status(run.id, Status.SUCCEEDED)
        recoveries = lease_recoveries(cluster.entries(run.id))
        assert [e.data["previous_epoch"] for e in recoveries] == [1]


SLOW_REMOVE = """
[pipelines.slow_remove]
source = { type = "demo", seed = 9, profiles = 100, events_per_slice = 60, page_size = 20, page_latency_ms = 60 }
resources = [
  { name = "profiles" },
  { name = "events", on_failure = "remove", slices = { start = "2026-01-01T00:00:00Z", end = "2026-01-02T06:00:00Z", step = "1h" } },
]
"""


def test_a_forced_cancel_of_a_frozen_child_is_cleaned_up_by_the_watchdog(
    cluster: Cluster,
) -> None:
    """The child holding the run is frozen (it never reaches a check, its heartbeat is
    frozen too), the run is cancelled by force and the child killed: the watchdog, not
    the dead worker, removes what ``on_failure = "remove"`` promises to leave nothing of,
    and only that; the pool's next child runs the next run."""
    with cluster.pipelines_file.open("a") as fh:
        fh.write(SLOW_REMOVE)
    cluster.env["QUARRY_CLEANUP_AFTER_SECONDS"] = "2"
    a = cluster.worker("a")
    cluster.beat()
    run_id = cluster.trigger("slow_remove")
    wait_for(lambda: cluster.slices_done(run_id) >= 3, "3 committed slices")
    output = cluster.data_dir / "output" / "slow_remove" / run_id
    assert sorted(p.name for p in output.iterdir()) == ["events", "profiles"]
    (child,) = a.children()
    os.kill(child, signal.SIGSTOP)
    control.cancel(cluster.store, run_id, force=True, by="test")
    os.kill(child, signal.SIGKILL)
    wait_for(
        lambda: any(e.event == "run_cleaned_up" for e in cluster.entries(run_id)),
        "the watchdog's cleanup",
    )
    assert sorted(p.name for p in output.iterdir()) == ["profiles"]  # append keep stays
    run = cluster.store.get_run(run_id)
    assert run.status is Status.CANCELLED and "by force" in (run.error_summary or "")
    assert cluster.wait_status(cluster.trigger("small"), Status.SUCCEEDED)


def test_cancel_while_queued_and_while_running(cluster: Cluster) -> None:
    """A queued run is cancelled at once; a running one stops at a safe point with run_cancelled."""
    queued = cluster.store.create_run("slow")  # never published: stays queued
    assert control.cancel(cluster.store, queued.id).status is Status.CANCELLED
    assert [e.event for e in cluster.entries(queued.id)] == ["run_cancelled"]

    a = cluster.worker("a")
    run_id = start_slow_run(cluster, a)
    control.cancel(cluster.store, run_id)
    run = cluster.wait_status(run_id, Status.CANCELLED, Status.SUCCEEDED)
    assert run.status is Status.CANCELLED
    entries = cluster.entries(run_id)
    assert entries[-1].event == "run_cancelled"
    assert entries[-1].worker_id == "a"
    done = run.checkpoint["resources"]["events"]["next_slice"] - 1
    assert slice_counts(entries) == {i: 1 for i in range(1, done + 1)}
    # The task has returned: nothing of this run can be written after this line.
    wait_for(lambda: "succeeded in" in a.log() and "'cancelled'" in a.log(), "the task to return")
    assert cluster.entries(run_id) == entries
    assert temp_files(cluster) == []
    with pytest.raises(IllegalTransition, match="already ended"):
        control.cancel(cluster.store, run_id)


def test_cancel_of_a_run_whose_worker_died_is_finished_by_the_watchdog(cluster: Cluster) -> None:
    """Cancel requested, owner dead: the watchdog ends the run cancelled instead of recovering it."""
    a = cluster.worker("a")
    run_id = start_slow_run(cluster, a)
    a.signal_group(signal.SIGKILL)
    control.cancel(cluster.store, run_id)
    cluster.worker("b")  # the watchdog's sweeps run on workers
    run = cluster.wait_status(run_id, Status.CANCELLED)
    last = cluster.entries(run_id)[-1]
    assert last.event == "watchdog_cancelled"
    assert "cancel requested" in (run.error_summary or "")


def test_attempts_exhausted_end_the_run(tmp_path: Path, pg_url: str, redis_url: str) -> None:
    """With max_attempts=1, a killed worker's run is given up, not retried."""
    c = Cluster(tmp_path, database_url=pg_url, broker_url=redis_url, max_attempts="1")
    try:
        c.beat()
        a = c.worker("a")
        run_id = start_slow_run(c, a)
        a.signal_group(signal.SIGKILL)
        c.worker("b")  # the watchdog's sweeps run on workers
        run = c.wait_status(run_id, Status.CANCELLED)
        assert "attempts exhausted (1/1)" in (run.error_summary or "")
        assert c.entries(run_id)[-1].event == "watchdog_cancelled"
    finally:
        c.close()


def test_queued_runs_survive_a_redis_restart(tmp_path: Path, pg_url: str) -> None:
    """Redis restarted without persistence loses the messages; the watchdog re-publishes the runs."""
    server = shutil.which("redis-server")
    if server is None:
        require("redis-server", FileNotFoundError("redis-server"))
    assert server is not None
    port = free_port()
    argv = [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    redis = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    c = Cluster(tmp_path, database_url=pg_url, broker_url=f"redis://127.0.0.1:{port}/0")
    try:
        wait_for(
            lambda: (
                subprocess.run(
                    ["redis-cli", "-p", str(port), "ping"], capture_output=True, check=False
                ).stdout.strip()
                == b"PONG"
            ),
            "redis",
        )
        run_ids = [c.trigger("small") for _ in range(3)]
        redis.terminate()
        redis.wait(timeout=10)
        redis = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
        c.beat()
        c.worker("a")
        for run_id in run_ids:
            run = c.wait_status(run_id, Status.SUCCEEDED, timeout=120)
            assert run.status is Status.SUCCEEDED
            assert "watchdog_recovery" in [e.event for e in c.entries(run_id)]
            assert written_rows(c, "small", run_id) == expected_rows(c, "small")
    finally:
        c.close()
        redis.terminate()
        redis.wait(timeout=10)


def test_a_run_waiting_on_a_hung_page_stops_at_sigterm_all_the_same(
    tmp_path: Path, pg_url: str, redis_url: str
) -> None:
    """A page that takes two minutes: the runner waits for it in steps, so SIGTERM still
    interrupts the run at once (checkpoint kept) and another worker resumes it."""
    c = Cluster(
        tmp_path, database_url=pg_url, broker_url=redis_url,
        shutdown_grace_seconds="5", soft_shutdown_seconds="1",
    )  # fmt: skip
    try:
        c.beat()
        a = c.worker("a")
        run_id = c.trigger("slow", page_latency_ms=120_000)  # one page takes two minutes
        wait_for(
            lambda: any(e.event == "resource_started" for e in c.entries(run_id)),
            "a to start its first resource",
        )
        time.sleep(1)  # a is now inside the two-minute page
        a.proc.send_signal(signal.SIGTERM)
        a.proc.wait(timeout=40)
        assert "did not reach a safe point" not in a.log()
        events = [e.event for e in c.entries(run_id)]
        assert "run_interrupted" in events
        c.worker("b")
        wait_for(
            lambda: (
                [e.worker_id for e in c.entries(run_id) if e.event == "lease_acquired"]
                == ["a", "b"]
            ),
            "b to resume the run",
        )
    finally:
        c.close()


def test_a_run_stuck_in_a_write_cannot_hold_up_shutdown(
    tmp_path: Path, pg_url: str, redis_url: str
) -> None:
    """A destination write that hangs (its table locked by someone else): after the grace the
    child is killed, the worker exits, the run is recovered."""
    schema = f"stuck_{secrets.token_hex(4)}"
    c = Cluster(
        tmp_path, database_url=pg_url, broker_url=redis_url,
        shutdown_grace_seconds="2", soft_shutdown_seconds="1",
    )  # fmt: skip
    with c.pipelines_file.open("a") as fh:
        fh.write(
            f'\n[pipelines.stuck]\nsource = {{ type = "demo", profiles = 50, lists = 1 }}\n'
            f'resources = [{{ name = "profiles" }}]\n'
            f'destination = {{ type = "sql", url = "{pg_url}", schema = "{schema}" }}\n'
        )
    dsn = pg_url.replace("postgresql+psycopg://", "postgresql://")
    locker = psycopg.connect(dsn)
    try:
        locker.execute(f'CREATE SCHEMA "{schema}"')
        locker.execute(
            f'CREATE TABLE "{schema}"._quarry_slices (dest_table text NOT NULL, run_id text NOT NULL,'
            " slice integer NOT NULL, epoch bigint NOT NULL, rows bigint,"
            " written_at timestamptz NOT NULL DEFAULT now(),"
            " PRIMARY KEY (dest_table, run_id, slice))"
        )
        locker.commit()
        locker.execute(f'LOCK TABLE "{schema}"._quarry_slices IN ACCESS EXCLUSIVE MODE')
        c.beat()
        a = c.worker("a")
        run_id = c.trigger("stuck")
        wait_for(
            lambda: any(e.event == "resource_started" for e in c.entries(run_id)),
            "a to start its resource",
        )
        time.sleep(1)  # a is now blocked claiming its slice
        a.proc.send_signal(signal.SIGTERM)
        a.proc.wait(timeout=40)
        assert "did not reach a safe point within 2s" in a.log()
        c.worker("b")  # runs the watchdog's sweeps
        wait_for(
            lambda: any(e.event == "watchdog_recovery" for e in c.entries(run_id)),
            "the watchdog to recover the run of the killed child",
        )
        assert "run_interrupted" not in [e.event for e in c.entries(run_id)]
        locker.rollback()  # the table is free again: b finishes the run
        assert c.wait_status(run_id, Status.SUCCEEDED, Status.FAILED).status is Status.SUCCEEDED
    finally:
        locker.rollback()
        locker.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        locker.commit()
        locker.close()
        c.close()
