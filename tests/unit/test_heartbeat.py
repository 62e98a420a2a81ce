"""The heartbeat renews the lease, samples telemetry, logs, and notices takeover and cancel."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator

import pytest
import structlog

from tests.acceptance.harness import wait_for
from worker import heartbeat, runlog
from worker.errors import LeaseLost
from worker.heartbeat import Heartbeat
from worker.models import Lease, Status
from worker.runlog import EntryWriter, StoreSink
from worker.settings import Settings
from worker.store import Store
from worker.telemetry import Telemetry

FAST = Settings(
    lease_ttl_seconds=2,
    lease_renew_seconds=0.1,
    heartbeat_log_seconds=0.2,
    telemetry_sample_seconds=0.1,
)


@pytest.fixture
def leased(sqlite_url: str) -> Iterator[tuple[Store, Lease, EntryWriter]]:
    """A store with one leased run and a logging pipeline into it."""
    store = Store(sqlite_url)
    run = store.create_run("demo")
    lease = store.acquire(run.id, "w1", FAST.lease_ttl_seconds)
    assert lease is not None
    writer = EntryWriter(store.append_entries, flush_ms=20)
    runlog.configure(StoreSink(writer), stream=io.StringIO())
    writer.start()
    yield store, lease, writer
    writer.close()
    structlog.reset_defaults()
    store.close()


def test_renews_samples_and_logs(leased: tuple[Store, Lease, EntryWriter]) -> None:
    """While running it pushes the expiry forward, stores samples and logs heartbeat entries."""
    store, lease, _ = leased
    telemetry = Telemetry(4)
    telemetry.add(rows=10)
    log = runlog.get_logger(run_id=lease.run_id, worker_id="w1").bind(attempt=1, epoch=lease.epoch)
    beat = Heartbeat(store, lease, FAST, telemetry, log)
    beat.start()
    try:
        wait_for(lambda: beat.renewals >= 3, "three renewals", 30)
        wait_for(lambda: store.entries(lease.run_id, event="heartbeat"), "a heartbeat entry", 30)
        wait_for(lambda: len(store.samples(lease.run_id)) >= 2, "two samples", 30)
    finally:
        beat.stop()
    run = store.get_run(lease.run_id)
    assert run.telemetry_summary["rows_loaded"] == 10
    assert beat.healthy
    (first, *_) = store.entries(lease.run_id, event="heartbeat")
    assert first.message.startswith("Heartbeat: 10 rows")


def test_takeover_marks_the_lease_lost(leased: tuple[Store, Lease, EntryWriter]) -> None:
    """When the watchdog takes the run, the next renew marks the lease lost and the beat stops."""
    store, lease, _ = leased
    beat = Heartbeat(store, lease, FAST, Telemetry(1), runlog.get_logger())
    beat.start()
    try:
        assert store.transition(
            lease.run_id, Status.RUNNING, Status.QUEUED, expected_epoch=lease.epoch
        )
        wait_for(beat.lost.is_set, "the lease to be marked lost", 30)
        assert not beat.healthy
    finally:
        beat.stop()


def test_cancel_request_is_seen(leased: tuple[Store, Lease, EntryWriter]) -> None:
    """A cancel request stored on the run reaches the runner through the next renew."""
    store, lease, _ = leased
    beat = Heartbeat(store, lease, FAST, Telemetry(1), runlog.get_logger())
    beat.start()
    try:
        assert store.request_cancel(lease.run_id)
        wait_for(beat.cancel_requested.is_set, "the cancel request to be seen", 30)
        assert not beat.lost.is_set()
    finally:
        beat.stop()


def test_a_runner_stuck_after_a_forced_cancel_has_its_process_ended(
    leased: tuple[Store, Lease, EntryWriter], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lease is taken (a forced cancel moved the epoch on) and the runner never stops:
    past the grace the heartbeat calls ``terminate``; a runner that stops in time is left."""
    monkeypatch.setattr(heartbeat, "LOST_GRACE_SECONDS", 0.3)
    store, lease, _ = leased
    log = runlog.get_logger(run_id=lease.run_id, worker_id="w1").bind(attempt=1, epoch=lease.epoch)
    ended: list[str] = []
    beat = Heartbeat(store, lease, FAST, Telemetry(1), log, terminate=ended.append)
    beat.start()
    assert store.transition(
        lease.run_id, Status.RUNNING, Status.CANCELLED, expected_epoch=lease.epoch
    )
    wait_for(lambda: ended, "the stuck runner's process to be ended", 30)
    assert "its lease is gone" in ended[0]
    beat.stop()

    other = store.create_run("demo")
    second = store.acquire(other.id, "w1", FAST.lease_ttl_seconds)
    assert second is not None
    spared: list[str] = []
    beat = Heartbeat(store, second, FAST, Telemetry(1), log, terminate=spared.append)
    beat.start()
    store.transition(other.id, Status.RUNNING, Status.CANCELLED, expected_epoch=second.epoch)
    wait_for(beat.lost.is_set, "the lost lease", 30)
    beat.stop()  # the runner stopped at its next check
    assert spared == []


def test_a_runner_stuck_past_its_run_timeout_fails_the_run_and_has_its_process_ended(
    leased: tuple[Store, Lease, EntryWriter], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The attempt's deadline passed and the runner never reached a check (a call that does
    not return): past the grace the heartbeat ends the run ``failed``, not retryable, as
    its holder, then the process."""
    monkeypatch.setattr(heartbeat, "TIMEOUT_GRACE_SECONDS", 0.3)
    store, lease, _ = leased
    log = runlog.get_logger(run_id=lease.run_id, worker_id="w1").bind(attempt=1, epoch=lease.epoch)
    ended: list[str] = []
    beat = Heartbeat(store, lease, FAST, Telemetry(1), log, terminate=ended.append)
    beat.deadline = time.monotonic()
    beat.start()
    try:
        wait_for(lambda: ended, "the stuck runner's process to be ended", 30)
    finally:
        beat.stop()
    assert "exceeded its run_timeout" in ended[0]
    run = store.get_run(lease.run_id)
    assert run.status is Status.FAILED
    assert run.error_summary == (
        "the attempt exceeded its run_timeout and the worker was stuck in a call"
    )
    (failed,) = store.entries(lease.run_id, event="run_failed")
    assert failed.data["retryable"] is False and failed.data["error_type"] == "RunTimeout"
    # The fence: the stuck runner's late writes are refused.
    with pytest.raises(LeaseLost):
        store.renew(lease, 30, {})
