"""Per-pipeline counters raised in the transaction of the change they count, on both databases."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest

from tests.store.test_store import entry
from worker import recovery, testing
from worker.errors import LeaseLost
from worker.models import Lease, Level, NewEntry, Status
from worker.store import Store
from worker.store import metrics as m
from worker.store.external import ExternalChange


def counters(store: Store) -> dict[tuple[str, str, str], float]:
    """Every stored counter row, by ``(pipeline, name, labels)``."""
    return {(p, n, lb): v for p, n, lb, v in store.metrics_snapshot().counters}


def observations(values: dict[tuple[str, str, str], float], pipeline: str, name: str) -> float:
    """How many observations histogram ``name`` of ``pipeline`` holds (its buckets' sum)."""
    return sum(v for (p, n, _), v in values.items() if p == pipeline and n == f"{name}_bucket")


def leased(store: Store, run_id: str) -> Lease:
    lease = store.acquire(run_id, "w", 30)
    assert isinstance(lease, Lease)
    return lease


def test_a_runs_life_is_counted_once_per_change(store: Store) -> None:
    """Started once (not per attempt), rows per committed slice, interruptions, recoveries and
    the end by status with its duration and the last success."""
    run = store.create_run("p")
    lease = leased(store, run.id)
    store.commit(lease, [entry(run.id, epoch=lease.epoch)], checkpoint={"n": 1}, loaded=(10, 100))
    store.commit(lease, [], checkpoint={"n": 2}, loaded=(5, 50))
    store.finish(lease, Status.INTERRUPTED, [entry(run.id)], interruption="sigterm")
    assert store.transition(
        run.id, Status.INTERRUPTED, Status.QUEUED, [entry(run.id)], recovery="fast"
    )
    lease = leased(store, run.id)  # the resumed attempt: not a second start
    store.requeue_for_retry(
        lease, [entry(run.id)], not_before=datetime.now(UTC), error_summary="blip"
    )
    lease = leased(store, run.id)
    before = time.time()
    store.finish(lease, Status.SUCCEEDED, [entry(run.id)])
    values = counters(store)
    assert values[("p", m.STARTED, "")] == 1
    assert observations(values, "p", m.QUEUE_WAIT) == 1
    assert values[("p", m.ROWS, "")] == 15
    assert values[("p", m.BYTES, "")] == 150
    assert values[("p", m.INTERRUPTIONS, "kind=sigterm")] == 1
    assert values[("p", m.INTERRUPTIONS, "kind=retry")] == 1
    assert values[("p", m.RECOVERIES, "kind=fast")] == 1
    assert values[("p", m.ENDED, "status=succeeded")] == 1
    assert observations(values, "p", m.DURATION) == 1
    assert values[("p", f"{m.DURATION}_sum", "status=succeeded")] >= 0
    assert before - 5 <= values[("p", m.LAST_SUCCESS, "")] <= time.time() + 5


def test_watchdog_actions_are_counted_by_kind(store: Store) -> None:
    """An expired lease recovered, then given up; a lost message re-published; an operator's
    cancel of a queued run ends it without a duration (it never started)."""
    run = store.create_run("w")
    leased(store, run.id)
    testing.expire_lease(store, run.id)
    (stale,) = testing.expired_runs(store)
    decide = {"db_now": store.db_time(), "now": datetime.now(UTC), "max_attempts": 2}
    decision = recovery.decide(stale, republish_after=timedelta(hours=1), **decide)
    assert decision.action is recovery.Action.RECOVER
    assert recovery.act(store, decision, lambda _id: None, max_attempts=2)
    leased(store, run.id)
    testing.expire_lease(store, run.id)
    (stale,) = testing.expired_runs(store)
    decide["db_now"] = store.db_time()
    decision = recovery.decide(stale, republish_after=timedelta(hours=1), **decide)
    assert decision.action is recovery.Action.GIVE_UP
    assert recovery.act(store, decision, lambda _id: None, max_attempts=2)
    queued = store.create_run("w")
    assert store.claim_republish(queued.id, queued.queued_at)
    assert not store.claim_republish(queued.id, queued.queued_at)  # lost the race: not counted
    assert store.transition(queued.id, Status.QUEUED, Status.CANCELLED)
    values = counters(store)
    assert values[("w", m.RECOVERIES, "kind=expired_lease")] == 1
    assert values[("w", m.RECOVERIES, "kind=give_up")] == 1
    assert values[("w", m.RECOVERIES, "kind=republish")] == 1
    assert values[("w", m.INTERRUPTIONS, "kind=worker_lost")] == 2
    assert values[("w", m.ENDED, "status=cancelled")] == 2
    assert observations(values, "w", m.DURATION) == 1  # the run that never started has none
    assert values[("w", m.STARTED, "")] == 1


def test_a_refused_or_rolled_back_change_counts_nothing(store: Store) -> None:
    """A zombie's fenced write and a transaction that fails before its commit add nothing, and
    leave nothing behind for the next transaction on the same connection."""
    run = store.create_run("z")
    lease = leased(store, run.id)

    def fail() -> None:
        raise RuntimeError("publish failed")

    with pytest.raises(RuntimeError):
        store.commit(lease, [entry(run.id)], checkpoint={}, loaded=(7, 70), before_commit=fail)
    store.commit(lease, [entry(run.id)], checkpoint={})
    store.commit(lease, [], checkpoint={})
    zombie = Lease(run.id, "w", lease.epoch - 1, 1, None)
    with pytest.raises(LeaseLost):
        store.commit(zombie, [], checkpoint={}, loaded=(9, 90))
    values = counters(store)
    assert ("z", m.ROWS, "") not in values
    assert values[("z", m.STARTED, "")] == 1


def test_entries_dropped_by_the_cap_are_counted(store: Store) -> None:
    """Info entries past ``max_entries_per_run`` are counted per pipeline as they are dropped."""
    store.max_entries_per_run = 100
    run = store.create_run("capped")
    lease = leased(store, run.id)
    store.append_entries([entry(run.id, epoch=lease.epoch) for _ in range(98)])
    store.append_entries([entry(run.id, epoch=lease.epoch) for _ in range(5)])
    store.commit(lease, [entry(run.id, epoch=lease.epoch) for _ in range(4)], checkpoint={})
    assert counters(store)[("capped", m.DROPPED, "")] == 7


def test_an_external_runners_end_counts_its_summary(store: Store) -> None:
    """A gateway's run ends through the PATCH contract: counted with its reported rows."""
    run = store.create_run("ext", gateway="east")
    lease = leased(store, run.id)
    change = ExternalChange(
        status=Status.FAILED,
        summary={"rows_loaded": 12, "bytesLoaded": 34},
        entries=[NewEntry(run.id, Level.ERROR, "run_failed", "x", datetime.now(UTC), {})],
    )
    store.write_external(run.id, lease, change, ttl_seconds=30, sample_cap=10)
    values = counters(store)
    assert values[("ext", m.ENDED, "status=failed")] == 1
    assert values[("ext", m.ROWS, "")] == 12
    assert values[("ext", m.BYTES, "")] == 34


def test_snapshot_counts_open_runs_per_pipeline(store: Store) -> None:
    """Runs by status over the store; per pipeline, active (started, not ended) and queued
    (never started) runs; the newest entry id."""
    a = store.create_run("a")
    store.create_run("a")
    b = store.create_run("b")
    leased(store, a.id)
    lease = leased(store, b.id)
    store.requeue_for_retry(lease, [entry(b.id)], not_before=datetime.now(UTC), error_summary="x")
    snap = store.metrics_snapshot()
    assert snap.runs == {"queued": 2, "running": 1}
    assert snap.active == {"a": 1, "b": 1}  # b is between attempts: it keeps its slot
    assert snap.queued == {"a": 1}
    assert snap.max_entry_id == store.entries(b.id)[-1].id
    assert snap.pipelines(["c"]) == ["a", "b", "c"]


def test_a_dead_pool_process_releases_exactly_the_epoch_it_held(store: Store) -> None:
    """The worker's fast path after a pool process died: its epoch only, counted lost_process;
    a later epoch (the run moved on) is left alone; a run it never took is published again."""
    published: list[str] = []
    run = store.create_run("p")
    lease = leased(store, run.id)
    stale = recovery.release_lost(
        store, run.id, lease.epoch - 1, "died", published.append, max_attempts=3
    )
    assert stale is recovery.Action.NONE
    assert store.get_run(run.id).status is Status.RUNNING
    done = recovery.release_lost(
        store, run.id, lease.epoch, "died", published.append, max_attempts=3
    )
    assert done is recovery.Action.RECOVER
    after = store.get_run(run.id)
    assert (after.status, after.attempt, published) == (Status.QUEUED, 2, [run.id])
    assert counters(store)[("p", m.RECOVERIES, "kind=lost_process")] == 1
    # Again (a second report of the same death): the run has moved on.
    again = recovery.release_lost(
        store, run.id, lease.epoch, "died", published.append, max_attempts=3
    )
    assert again is recovery.Action.NONE
    # Died before taking the lease: the queued run is published again, nothing else changes.
    fresh = store.create_run("p")
    early = recovery.release_lost(store, fresh.id, None, "died", published.append, max_attempts=3)
    assert early is recovery.Action.REPUBLISH
    assert published == [run.id, fresh.id]
    assert store.get_run(fresh.id).status is Status.QUEUED
