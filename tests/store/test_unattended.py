"""The store's part in unattended pipelines, on SQLite and PostgreSQL: fire times exactly
once, max_active_runs under races, retries that wait for their time, pause state."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from unittest import mock

from scheduler.watchdog import WAKE_GRACE, sweep
from worker import control
from worker.models import Lease, Level, NewEntry, Status, Trigger
from worker.recovery import Action
from worker.runner import Runner
from worker.store import Store
from worker.store.pipelines import Fire
from worker.store.store import Waiting

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def fire(hour: int) -> Fire:
    end = T0 + timedelta(hours=hour)
    return Fire(end, end - timedelta(hours=1), end)


def race(n: int, work: object) -> list[object]:
    """Run ``work(i)`` in ``n`` threads released at the same instant; their results."""
    results: list[object] = [None] * n
    barrier = threading.Barrier(n)

    def go(i: int) -> None:
        barrier.wait()
        results[i] = work(i)  # type: ignore[operator]

    threads = [threading.Thread(target=go, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_a_fire_time_makes_one_run_however_many_ask(store: Store) -> None:
    """Eight beats creating the same three fire times at once: three runs, each once."""
    results = race(
        8, lambda _i: store.create_fired("p", [fire(1), fire(2), fire(3)], trigger=Trigger.SCHEDULE)
    )
    created = [run for batch in results for run in batch]  # type: ignore[attr-defined]
    assert sorted(r.fire_time for r in created) == [fire(h).fire_time for h in (1, 2, 3)]
    runs = store.list_runs(pipeline="p")
    assert len(runs) == 3
    run = store.get_run(created[0].id)
    assert run.trigger == "schedule"
    assert run.interval_end == run.fire_time
    assert run.interval_start == run.fire_time - timedelta(hours=1)  # type: ignore[operator]
    # A backfill of the same intervals adds nothing; another pipeline's same time is its own.
    assert store.create_fired("p", [fire(2)], trigger=Trigger.BACKFILL) == []
    assert len(store.create_fired("q", [fire(2)], trigger=Trigger.BACKFILL)) == 1


def test_the_clock_only_moves_forward(store: Store) -> None:
    store.start_schedule("p", "@hourly UTC", T0)
    store.create_fired("p", [fire(3)], trigger=Trigger.SCHEDULE, advance_clock=True)
    store.create_fired("p", [fire(2)], trigger=Trigger.SCHEDULE, advance_clock=True)
    state = store.pipeline_states(["p"])["p"]
    assert state.last_fire == fire(3).fire_time
    assert state.anchor == T0


def test_four_workers_start_exactly_max_active_runs(store: Store) -> None:
    """Four runs of a pipeline taken at the same instant under a limit of one: one starts,
    three wait naming it, each with one entry."""
    runs = [store.create_run("p") for _ in range(4)]

    def waiting_entry(run_id: str) -> object:
        return lambda blocker: [
            NewEntry(run_id, Level.INFO, "run_waiting", f"waits for {blocker}", datetime.now(UTC))
        ]

    results = race(
        4,
        lambda i: store.acquire(
            runs[i].id, f"w{i}", 30, max_active=1, on_wait=waiting_entry(runs[i].id)
        ),
    )
    leases = [r for r in results if isinstance(r, Lease)]
    waits = [r for r in results if isinstance(r, Waiting)]
    assert len(leases) == 1 and len(waits) == 3
    holder = leases[0].run_id
    assert {w.blocker for w in waits} == {holder}
    for run in runs:
        stored = store.get_run(run.id)
        if run.id == holder:
            assert stored.status is Status.RUNNING and stored.waiting_for is None
        else:
            assert stored.status is Status.QUEUED and stored.waiting_for == holder
            # A second refusal for the same blocker writes no second entry.
            assert isinstance(store.acquire(run.id, "again", 30, max_active=1), Waiting)
            events = [e.event for e in store.entries(run.id)]
            assert events == ["run_waiting"]


def test_a_limit_of_two_starts_two_and_the_freed_slot_goes_to_the_oldest(store: Store) -> None:
    runs = [store.create_run("p") for _ in range(5)]
    results = race(5, lambda i: store.acquire(runs[i].id, f"w{i}", 30, max_active=2))
    leases = [r for r in results if isinstance(r, Lease)]
    assert len(leases) == 2
    assert store.active_counts(["p"]) == {"p": 2}
    store.finish(leases[0], Status.SUCCEEDED)
    waiting = store.waiting_runs("p", 5)
    assert len(waiting) == 3
    assert [r.id for r in waiting] == [r.id for r in runs if r.id in {w.id for w in waiting}]
    assert isinstance(store.acquire(waiting[0].id, "w9", 30, max_active=2), Lease)
    assert isinstance(store.acquire(waiting[1].id, "w9", 30, max_active=2), Waiting)


def test_a_run_ended_without_its_worker_has_its_waiter_woken_by_the_watchdog(
    store: Store,
) -> None:
    """A forced cancel (its stuck worker wakes nobody): the next sweep publishes the run
    that waited for it, once, and leaves a run waiting for a live run alone."""
    first, second, other, blocked = (store.create_run(p) for p in ("p", "p", "q", "q"))
    lease = store.acquire(first.id, "w1", 30, max_active=1)
    other_lease = store.acquire(other.id, "w3", 30, max_active=1)
    assert isinstance(lease, Lease) and isinstance(other_lease, Lease)
    assert isinstance(store.acquire(second.id, "w2", 30, max_active=1), Waiting)
    assert isinstance(store.acquire(blocked.id, "w4", 30, max_active=1), Waiting)
    control.cancel(store, first.id, force=True, by="test")
    published: list[str] = []
    # Within the grace its worker (had it one) would have woken it: nothing yet.
    sweep(store, published.append, max_attempts=3)
    assert published == []
    later = datetime.now(UTC) + 2 * WAKE_GRACE
    assert [r.id for r in store.stranded_waiters(later)] == [second.id]
    with mock.patch("scheduler.watchdog.datetime") as clock:
        clock.now.return_value = later
        won = sweep(store, published.append, max_attempts=3)
        assert published == [second.id]
        assert [(d.run.id, d.action) for d in won] == [(second.id, Action.WAKE)]
        # Its queued clock restarted: the next sweep does not publish it again.
        sweep(store, published.append, max_attempts=3)
    assert published == [second.id]
    (woke,) = [e for e in store.entries(second.id) if e.event == "watchdog_recovery"]
    assert woke.message == f"Woke waiting run: {first.id}, which it waited for, ended"
    assert isinstance(store.acquire(second.id, "w2", 30, max_active=1), Lease)


def test_a_run_between_attempts_keeps_its_slot(store: Store) -> None:
    """A run waiting for its retry has started: a later run does not overtake it."""
    first, second = store.create_run("p"), store.create_run("p")
    lease = store.acquire(first.id, "w1", 30, max_active=1)
    assert isinstance(lease, Lease)
    due = datetime.now(UTC) + timedelta(hours=1)
    store.requeue_for_retry(lease, [], not_before=due, error_summary="connection refused")
    retried = store.get_run(first.id)
    assert (retried.status, retried.attempt, retried.retries) == (Status.QUEUED, 2, 1)
    assert retried.recoveries == 0
    assert retried.attempt_reason == "retry of attempt 1"
    assert retried.error_summary == "connection refused"
    assert isinstance(store.acquire(second.id, "w2", 30, max_active=1), Waiting)
    # Not before its time, and not published early by the tick either.
    assert store.acquire(first.id, "w1", 30, max_active=1) is None
    assert store.claim_due_retries(datetime.now(UTC)) == []
    assert store.claim_due_retries(due + timedelta(seconds=1)) == [first.id]
    assert store.claim_due_retries(due + timedelta(seconds=1)) == []  # claimed once
    again = store.acquire(first.id, "w1", 30, max_active=1)
    assert isinstance(again, Lease) and again.attempt == 2


def test_pause_and_resume_restart_the_clock(store: Store) -> None:
    store.start_schedule("p", "@hourly UTC", T0)
    paused = store.set_paused("p", True, "cli:ann")
    assert paused.paused and paused.paused_by == "cli:ann"
    resumed = store.set_paused("p", False, "cli:ann")
    assert not resumed.paused and resumed.paused_by is None
    assert resumed.anchor is not None and resumed.anchor > T0
    assert resumed.schedule_key == "@hourly UTC"


def test_the_newest_runs_of_each_pipeline_in_one_query(store: Store) -> None:
    made = {name: [store.create_run(name) for _ in range(4)] for name in ("p", "q")}
    last = store.last_runs(["p", "q", "none"], per_pipeline=3)
    for name, runs in made.items():
        assert [r.id for r in last[name]] == [r.id for r in reversed(runs)][:3]
    assert last["none"] == []


def test_the_incremental_mark_comes_from_the_newest_succeeded_run_only(store: Store) -> None:
    """A failed or cancelled run (even a newer one) never advances the mark the next run
    reads from; neither does one still running."""

    def run_with_mark(status: Status | None, mark: int) -> None:
        run = store.create_run("p")
        lease = store.acquire(run.id, "w", 30)
        assert isinstance(lease, Lease)
        checkpoint = {"resources": {"orders": {"status": "in_progress", "high_water": mark}}}
        if status is None:
            store.commit(lease, checkpoint=checkpoint)
        else:
            store.finish(lease, status, checkpoint=checkpoint, error_summary="x")

    run_with_mark(Status.SUCCEEDED, 10)
    run_with_mark(Status.FAILED, 20)
    run_with_mark(Status.CANCELLED, 30)
    run_with_mark(None, 40)
    marks = Runner._previous_marks(SimpleNamespace(store=store), "p")  # type: ignore[arg-type]
    assert marks == {"orders": 10}
    run_with_mark(Status.SUCCEEDED, 50)
    assert Runner._previous_marks(SimpleNamespace(store=store), "p") == {"orders": 50}  # type: ignore[arg-type]
