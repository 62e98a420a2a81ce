"""The store's behaviour suite, run once on SQLite and once on PostgreSQL."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from worker import testing
from worker.errors import IllegalTransition, LeaseLost, RunNotFound, StoreUnavailable
from worker.models import Lease, Level, NewEntry, Run, Status
from worker.store import Store


def entry(
    run_id: str, event: str = "e", *, epoch: int | None = None, level: Level = Level.INFO
) -> NewEntry:
    """A minimal entry for ``run_id``."""
    return NewEntry(
        run_id, level, event, f"{event} message", datetime.now(UTC), {"k": 1}, "w", 1, epoch
    )


def test_create_and_get_round_trip(store: Store) -> None:
    """A created run is queued, attempt 1, with its params and no lease."""
    run = store.create_run("demo", {"profiles": 10, "nested": {"a": [1, 2]}})
    got = store.get_run(run.id)
    assert got.status is Status.QUEUED
    assert got.attempt == 1
    assert got.params == {"profiles": 10, "nested": {"a": [1, 2]}}
    assert got.lease_owner is None
    assert got.lease_epoch == 0
    assert got.created_at.tzinfo is not None


def test_unknown_run_raises(store: Store) -> None:
    """Reading a run that does not exist raises RunNotFound."""
    with pytest.raises(RunNotFound):
        store.get_run("run_missing")


def test_acquire_bumps_epoch_and_writes_entries_atomically(store: Store) -> None:
    """Acquire moves queued → running, bumps the epoch and commits its entries with it."""
    run = store.create_run("demo")
    lease = store.acquire(
        run.id, "w1", 30, lambda lease: [entry(run.id, "lease_acquired", epoch=lease.epoch)]
    )
    assert lease is not None
    assert lease.epoch == 1
    got = store.get_run(run.id)
    assert got.status is Status.RUNNING
    assert got.lease_owner == "w1"
    assert got.lease_expires_at is not None
    assert got.lease_expires_at > store.db_time() + 25
    assert [e.event for e in store.entries(run.id)] == ["lease_acquired"]


def test_second_acquire_conflicts(store: Store) -> None:
    """A run with a live lease cannot be acquired again: the second delivery gets None."""
    run = store.create_run("demo")
    assert store.acquire(run.id, "w1", 30) is not None
    assert store.acquire(run.id, "w2", 30) is None
    assert store.get_run(run.id).lease_owner == "w1"


def test_concurrent_acquires_have_one_winner(store: Store) -> None:
    """Of many threads racing to acquire, exactly one wins."""
    run = store.create_run("demo")
    results: list[object] = []
    barrier = threading.Barrier(8)

    def race(n: int) -> None:
        barrier.wait()
        results.append(store.acquire(run.id, f"w{n}", 30))

    threads = [threading.Thread(target=race, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(r is not None for r in results) == 1


def test_renew_extends_and_reports_cancel(store: Store) -> None:
    """Renew pushes the expiry on the database clock and stores the telemetry summary."""
    run = store.create_run("demo")
    lease = store.acquire(run.id, "w1", 5)
    assert lease is not None
    assert store.renew(lease, 60, {"rows_loaded": 7}) is False
    got = store.get_run(run.id)
    assert got.lease_expires_at is not None
    assert got.lease_expires_at > store.db_time() + 50
    assert got.telemetry_summary == {"rows_loaded": 7}


def test_takeover_fences_the_old_holder(store: Store) -> None:
    """After recovery and a new acquire, every write of the old epoch raises LeaseLost."""
    run = store.create_run("demo")
    old = store.acquire(run.id, "w1", 30)
    assert old is not None
    testing.expire_lease(store, run.id)
    assert [r.id for r in testing.expired_runs(store)] == [run.id]
    assert store.transition(
        run.id, Status.RUNNING, Status.QUEUED, expected_epoch=old.epoch, bump_attempt=True
    )
    new = store.acquire(run.id, "w2", 30)
    assert new is not None
    assert new.epoch > old.epoch
    assert new.attempt == 2
    with pytest.raises(LeaseLost):
        store.renew(old, 30)
    with pytest.raises(LeaseLost):
        store.commit(old, [entry(run.id, epoch=old.epoch)], checkpoint={"x": 1})
    with pytest.raises(LeaseLost):
        store.finish(old, Status.SUCCEEDED, [entry(run.id, "run_completed", epoch=old.epoch)])
    refused = store.append_entries(
        [entry(run.id, "late", epoch=old.epoch), entry(run.id, "ok", epoch=new.epoch)]
    )
    assert refused == {(run.id, old.epoch)}
    assert [e.event for e in store.entries(run.id)] == ["ok"]
    assert store.get_run(run.id).checkpoint == {}


def test_expired_lease_is_not_stolen_by_acquire(store: Store) -> None:
    """Acquire only claims queued runs: an expired running run waits for the watchdog."""
    run = store.create_run("demo")
    assert store.acquire(run.id, "w1", 30) is not None
    testing.expire_lease(store, run.id)
    assert store.acquire(run.id, "w2", 30) is None


def test_recovery_is_won_once(store: Store) -> None:
    """Two watchdogs recovering the same stale epoch: exactly one transition wins."""
    run = store.create_run("demo")
    lease = store.acquire(run.id, "w1", 30)
    assert lease is not None
    wins = [
        store.transition(
            run.id, Status.RUNNING, Status.QUEUED, expected_epoch=lease.epoch, bump_attempt=True
        )
        for _ in range(2)
    ]
    assert wins == [True, False]
    assert store.get_run(run.id).attempt == 2


def test_commit_is_atomic_with_before_commit(store: Store) -> None:
    """A failing before_commit rolls back the checkpoint and the entries."""
    run = store.create_run("demo")
    lease = store.acquire(run.id, "w1", 30)
    assert lease is not None

    def boom() -> None:
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        store.commit(
            lease,
            [entry(run.id, "slice_completed", epoch=lease.epoch)],
            checkpoint={"n": 1},
            before_commit=boom,
        )
    assert store.get_run(run.id).checkpoint == {}
    assert store.entries(run.id) == []
    store.commit(lease, [entry(run.id, "slice_completed", epoch=lease.epoch)], checkpoint={"n": 1})
    assert store.get_run(run.id).checkpoint == {"n": 1}


def test_finish_releases_the_lease(store: Store) -> None:
    """Finishing sets the status, clears the lease and stamps finished_at for terminal states."""
    run = store.create_run("demo")
    lease = store.acquire(run.id, "w1", 30)
    assert lease is not None
    store.finish(lease, Status.SUCCEEDED, [entry(run.id, "run_completed", epoch=lease.epoch)])
    got = store.get_run(run.id)
    assert got.status is Status.SUCCEEDED
    assert got.lease_owner is None
    assert got.finished_at is not None
    with pytest.raises(LeaseLost):
        store.renew(lease, 30)


def test_interrupted_run_is_released_not_finished(store: Store) -> None:
    """An interrupted run keeps no lease and no finished_at: it will be resumed."""
    run = store.create_run("demo")
    lease = store.acquire(run.id, "w1", 30)
    assert lease is not None
    store.finish(lease, Status.INTERRUPTED, checkpoint={"position": 3})
    got = store.get_run(run.id)
    assert got.status is Status.INTERRUPTED
    assert got.finished_at is None
    assert got.checkpoint == {"position": 3}
    assert store.transition(run.id, Status.INTERRUPTED, Status.QUEUED)
    assert store.acquire(run.id, "w2", 30) is not None


@pytest.mark.parametrize(
    ("current", "target"),
    [
        (Status.QUEUED, Status.SUCCEEDED),
        (Status.SUCCEEDED, Status.RUNNING),
        (Status.FAILED, Status.QUEUED),
        (Status.CANCELLED, Status.QUEUED),
        (Status.QUEUED, Status.INTERRUPTED),
    ],
)
def test_illegal_transitions_are_refused(store: Store, current: Status, target: Status) -> None:
    """The store refuses status changes the state machine does not allow."""
    run = store.create_run("demo")
    with pytest.raises(IllegalTransition):
        store.transition(run.id, current, target)
    assert store.get_run(run.id).status is Status.QUEUED


def test_finish_refuses_queued(store: Store) -> None:
    """A holder cannot 'finish' a run back into the queue."""
    run = store.create_run("demo")
    lease = store.acquire(run.id, "w1", 30)
    assert lease is not None
    with pytest.raises(IllegalTransition):
        store.finish(lease, Status.QUEUED)


def test_transition_from_wrong_status_loses(store: Store) -> None:
    """A transition whose expected status is stale changes nothing."""
    run = store.create_run("demo")
    assert store.transition(run.id, Status.RUNNING, Status.FAILED) is False
    assert store.get_run(run.id).status is Status.QUEUED
    assert store.transition(run.id, Status.QUEUED, Status.CANCELLED) is True
    assert store.get_run(run.id).finished_at is not None


def test_cancelled_queued_run_cannot_be_acquired(store: Store) -> None:
    """A cancelled run is never picked up by a late delivery."""
    run = store.create_run("demo")
    store.transition(run.id, Status.QUEUED, Status.CANCELLED)
    assert store.acquire(run.id, "w1", 30) is None


def test_entry_ids_grow_and_cursor_pages_without_gaps(store: Store) -> None:
    """Ids grow monotonically; paging by the id cursor returns every entry once, in order."""
    run = store.create_run("demo")
    store.append_entries([entry(run.id, f"e{i}") for i in range(250)])
    seen: list[str] = []
    cursor = 0
    while batch := store.entries(run.id, after_id=cursor, limit=100):
        assert all(b.id > cursor for b in batch)
        seen += [b.event for b in batch]
        cursor = batch[-1].id
    assert seen == [f"e{i}" for i in range(250)]


def test_level_filter_means_at_least(store: Store) -> None:
    """``min_level=warning`` returns warnings and errors; ``error`` only errors."""
    run = store.create_run("demo")
    store.append_entries(
        [
            entry(run.id, "i", level=Level.INFO),
            entry(run.id, "w", level=Level.WARNING),
            entry(run.id, "x", level=Level.ERROR),
        ]
    )
    assert [e.event for e in store.entries(run.id, min_level=Level.WARNING)] == ["w", "x"]
    assert [e.event for e in store.entries(run.id, min_level=Level.ERROR)] == ["x"]
    assert [e.event for e in store.entries(run.id, event="w")] == ["w"]


def test_entries_keep_text_and_data_verbatim(store: Store) -> None:
    """Newlines, unicode and nested data come back exactly as written."""
    run = store.create_run("demo")
    weird = "line1\nline2\r\n\u2028 \x1b[31mred\x1b[0m data: x\n\nevent: y"
    store.append_entries(
        [
            NewEntry(
                run.id, Level.INFO, "e", weird, datetime.now(UTC), {"a": {"b": [1, "ü"]}}, "w", 1
            )
        ]
    )
    (got,) = store.entries(run.id)
    assert got.message == weird
    assert got.data == {"a": {"b": [1, "ü"]}}


def test_concurrent_writers_never_show_a_reader_a_gap(store: Store) -> None:
    """While several threads append, a reader paging by cursor sees every entry exactly once."""
    run = store.create_run("demo")
    writers, per_writer = 4, 60
    done = threading.Event()
    seen: list[str] = []

    def write(n: int) -> None:
        for i in range(per_writer):
            store.append_entries([entry(run.id, f"w{n}-{i}")])

    def read() -> None:
        cursor = 0
        while True:
            finished = done.is_set()
            batch = store.entries(run.id, after_id=cursor, limit=1000)
            seen.extend(e.event for e in batch)
            if batch:
                cursor = batch[-1].id
            elif finished:
                return
            time.sleep(0.001)

    reader = threading.Thread(target=read)
    reader.start()
    threads = [threading.Thread(target=write, args=(n,)) for n in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    reader.join()
    assert len(seen) == writers * per_writer
    assert len(set(seen)) == writers * per_writer


def test_samples_are_thinned_to_span_the_run(store: Store) -> None:
    """Past the cap the series is thinned, keeping the first and the newest points."""
    run = store.create_run("demo")
    for i in range(50):
        store.append_sample(run.id, {"i": i}, cap=20)
    values = [v["i"] for _, v in store.samples(run.id)]
    assert len(values) <= 20
    assert values[0] == 0
    assert values[-1] == 49
    assert values == sorted(values)


def test_list_runs_filters(store: Store) -> None:
    """Runs list newest first and filter by status and pipeline."""
    a = store.create_run("alpha")
    b = store.create_run("beta")
    store.transition(a.id, Status.QUEUED, Status.CANCELLED)
    assert [r.id for r in store.list_runs()] == [b.id, a.id]
    assert [r.id for r in store.list_runs(status=Status.CANCELLED)] == [a.id]
    assert [r.id for r in store.list_runs(pipeline="beta")] == [b.id]


def test_retention_deletes_only_old_rows_in_batches(store: Store) -> None:
    """Entries and samples older than the cutoff go, in small batches; newer ones stay."""
    run = store.create_run("demo")
    old = datetime(2020, 1, 1, tzinfo=UTC)
    store.append_entries(
        [NewEntry(run.id, Level.INFO, "old", "m", old, {}) for _ in range(25)]
        + [entry(run.id, "new") for _ in range(3)]
    )
    for i in range(5):
        store.append_sample(run.id, {"i": i}, at=old)
    store.append_sample(run.id, {"i": "new"})
    deleted = store.delete_older_than(datetime(2021, 1, 1, tzinfo=UTC), batch=10)
    # On PostgreSQL these are in the default partition (no day of 2020 exists): row by row.
    assert (deleted["entries"], deleted["samples"]) == (25, 5)
    assert [e.event for e in store.entries(run.id)] == ["new"] * 3
    assert [v for _, v in store.samples(run.id)] == [{"i": "new"}]


def test_nul_characters_are_stored_escaped_not_refused(store: Store) -> None:
    """NUL in a message, event or data (binary garbage from a source) is stored as ``\\x00``."""
    run = store.create_run("demo")
    store.append_entries(
        [
            NewEntry(
                run.id, Level.ERROR, "e\x00", "bad\x00byte", datetime.now(UTC), {"k\x00": ["v\x00"]}
            )
        ]
    )
    (got,) = store.entries(run.id)
    assert got.message == "bad\\x00byte"
    assert got.event == "e\\x00"
    assert got.data == {"k\\x00": ["v\\x00"]}


def capped_run(store: Store, cap: int) -> tuple[Run, Lease]:
    """A leased run on ``store`` with ``cap`` info entries a run."""
    store.max_entries_per_run = cap
    run = store.create_run("demo")
    lease = store.acquire(run.id, "w", 30)
    assert lease is not None
    return run, lease


def test_entry_cap_counts_through_checkpoint_commits(store: Store) -> None:
    """A checkpoint's entries are counted by the fence's own UPDATE: the same cap, the same
    log_truncated entries, a mix of pipe-written and committed entries counted together."""
    run, lease = capped_run(store, 5)
    store.append_entries([entry(run.id, f"a{i}", epoch=lease.epoch) for i in range(2)])
    store.commit(
        lease,
        [entry(run.id, f"c{i}", epoch=lease.epoch) for i in range(2)],
        checkpoint={"n": 1},
    )
    store.commit(
        lease,
        [entry(run.id, f"d{i}", epoch=lease.epoch) for i in range(3)]
        + [entry(run.id, "warn", epoch=lease.epoch, level=Level.WARNING)],
        checkpoint={"n": 2},
    )
    store.commit(lease, [entry(run.id, "e0", epoch=lease.epoch)], checkpoint={"n": 3})
    store.finish(lease, Status.SUCCEEDED, [entry(run.id, "run_completed", epoch=lease.epoch)])
    events = [e.event for e in store.entries(run.id)]
    assert events == [
        "a0",
        "a1",
        "c0",
        "c1",
        "d0",
        "warn",
        "log_truncated",
        "log_truncated",
        "run_completed",
    ]
    first, final = [e for e in store.entries(run.id) if e.event == "log_truncated"]
    assert first.data == {"limit": 5, "dropped": 2, "final": False}
    assert final.data == {"limit": 5, "dropped": 3, "final": True}
    assert store.get_run(run.id).checkpoint == {"n": 3}


def test_entry_cap_drops_info_keeps_warnings_and_counts(store: Store) -> None:
    """Past the cap, info entries are dropped, warnings and errors kept, and log_truncated counts them."""
    run, lease = capped_run(store, 5)
    batch = [entry(run.id, f"i{i}", epoch=lease.epoch) for i in range(4)]
    store.append_entries(batch)
    store.append_entries(
        [entry(run.id, f"j{i}", epoch=lease.epoch) for i in range(4)]
        + [entry(run.id, "warn", epoch=lease.epoch, level=Level.WARNING)]
    )
    store.append_entries(
        [
            entry(run.id, "k", epoch=lease.epoch),
            entry(run.id, "err", epoch=lease.epoch, level=Level.ERROR),
        ]
    )
    store.finish(lease, Status.SUCCEEDED, [entry(run.id, "run_completed", epoch=lease.epoch)])
    events = [e.event for e in store.entries(run.id)]
    assert events == [
        "i0",
        "i1",
        "i2",
        "i3",
        "j0",
        "warn",
        "log_truncated",
        "err",
        "log_truncated",
        "run_completed",
    ]
    first, final = [e for e in store.entries(run.id) if e.event == "log_truncated"]
    assert first.data == {"limit": 5, "dropped": 3, "final": False}
    assert final.data == {"limit": 5, "dropped": 4, "final": True}
    assert first.level is Level.WARNING


def test_an_unreachable_store_raises_store_unavailable(tmp_path: Path) -> None:
    """Callers catch one Quarry error for an outage, whatever the driver: SQLAlchemy's path
    and the raw-cursor reads alike."""
    refused = Store("postgresql+psycopg://postgres@127.0.0.1:1/nowhere")
    with pytest.raises(StoreUnavailable, match="OperationalError"):
        refused.get_run("run_x")
    with pytest.raises(StoreUnavailable):
        refused.verify_token("qry_" + "x" * 40)
    refused.close()
    (tmp_path / "a-directory.db").mkdir()
    unopenable = Store(f"sqlite:///{tmp_path / 'a-directory.db'}")
    with pytest.raises(StoreUnavailable, match="unable to open database file"):
        unopenable.get_run("run_x")
    unopenable.close()


def test_a_sample_is_fenced_by_its_lease_epoch(store: Store) -> None:
    """A heartbeat's telemetry point is written while its epoch holds the run, and refused
    once the run was taken over (a worker back from a partition writes nothing)."""
    run = store.create_run("p")
    lease = store.acquire(run.id, "w", 30)
    assert isinstance(lease, Lease)
    assert store.append_sample(run.id, {"rows_loaded": 1}, epoch=lease.epoch) is True
    testing.expire_lease(store, run.id)
    assert store.transition(run.id, Status.RUNNING, Status.QUEUED, expected_epoch=lease.epoch)
    assert store.append_sample(run.id, {"rows_loaded": 2}, epoch=lease.epoch) is False
    assert [values["rows_loaded"] for _, values in store.samples(run.id)] == [1]
