"""The console's reads: the dashboard strip's counts (scoped to a gateway) and attempt history."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from worker.models import Event, Level, NewEntry, Status
from worker.store import Store


def _entry(run_id: str, event: Event, at: datetime, worker: str = "w1") -> NewEntry:
    return NewEntry(
        run_id=run_id,
        level=Level.INFO,
        event=event.value,
        message=event.value,
        occurred_at=at,
        data={},
        worker_id=worker,
        attempt=1,
    )


def test_the_dashboard_counts_the_last_day_and_hour(store: Store) -> None:
    now = datetime.now(UTC)
    running = store.create_run("alpha").id
    assert store.acquire(running, "w1", 30) is not None
    store.create_run("alpha")  # queued
    done = store.create_run("alpha").id
    store.acquire(done, "w1", 30)
    lease = store.get_run(done)
    assert store.transition(
        done, Status.RUNNING, Status.SUCCEEDED, expected_epoch=lease.lease_epoch
    )
    failed = store.create_run("beta", gateway="edge").id
    store.acquire(failed, "w2", 30)
    epoch = store.get_run(failed).lease_epoch
    assert store.transition(
        failed, Status.RUNNING, Status.FAILED, expected_epoch=epoch, error_summary="boom"
    )
    # Samples: 100 rows an hour and a half ago (outside the window), 400 and 1,000 inside.
    store.append_sample(running, {"rows_loaded": 100}, at=now - timedelta(minutes=90))
    store.append_sample(running, {"rows_loaded": 400}, at=now - timedelta(minutes=50))
    store.append_sample(running, {"rows_loaded": 1000}, at=now - timedelta(minutes=1))
    store.append_entries(
        [
            _entry(running, Event.RUN_INTERRUPTED, now - timedelta(hours=2)),
            _entry(running, Event.WATCHDOG_FAST_RECOVERY, now - timedelta(hours=2)),
            _entry(running, Event.WATCHDOG_RECOVERY, now - timedelta(hours=30)),  # too old
            _entry(failed, Event.WATCHDOG_RECOVERY, now - timedelta(hours=1)),
        ]
    )
    strip = store.dashboard(now=now + timedelta(seconds=1))
    assert (strip.running, strip.queued, strip.succeeded_24h, strip.failed_24h) == (1, 1, 1, 1)
    assert strip.rows_last_hour == 600
    assert (strip.interrupted_24h, strip.recovered_24h) == (1, 2)
    edge = store.dashboard(gateway="edge", now=now + timedelta(seconds=1))
    assert (edge.running, edge.queued, edge.succeeded_24h, edge.failed_24h) == (0, 0, 0, 1)
    assert (edge.rows_last_hour, edge.interrupted_24h, edge.recovered_24h) == (0, 0, 1)
    assert store.dashboard(gateway="nowhere").running == 0


def test_attempt_history_is_the_lifecycle_entries_in_order(store: Store) -> None:
    run_id = store.create_run("alpha").id
    now = datetime.now(UTC)
    store.append_entries(
        [
            _entry(run_id, Event.LEASE_ACQUIRED, now, "a"),
            _entry(run_id, Event.SLICE_COMPLETED, now, "a"),
            _entry(run_id, Event.RUN_INTERRUPTED, now, "a"),
            _entry(run_id, Event.WATCHDOG_FAST_RECOVERY, now, "watchdog"),
            _entry(run_id, Event.LEASE_ACQUIRED, now, "b"),
            _entry(run_id, Event.RUN_COMPLETED, now, "b"),
        ]
    )
    history = store.attempt_history(run_id)
    assert [(e.event, e.worker_id) for e in history] == [
        ("lease_acquired", "a"),
        ("run_interrupted", "a"),
        ("watchdog_fast_recovery", "watchdog"),
        ("lease_acquired", "b"),
        ("run_completed", "b"),
    ]
