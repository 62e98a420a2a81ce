"""The log writer's flusher: what ``append_entries`` stores, on a connection kept for it."""

from __future__ import annotations

import psycopg
import pytest
from sqlalchemy.engine import make_url

from tests.store.test_store import capped_run, entry
from worker import testing
from worker.errors import StoreUnavailable
from worker.models import Level, Status
from worker.store import Store
from worker.store.flusher import EntryFlusher


def _kept_pid(flusher: EntryFlusher) -> int:
    """The backend pid of the flusher's kept connection (PostgreSQL)."""
    pooled = flusher._pooled
    assert pooled is not None, "the flusher keeps no connection"
    return int(pooled.driver_connection.info.backend_pid)


def _admin(store: Store) -> psycopg.Connection:
    url = make_url(store.url).set(drivername="postgresql")
    return psycopg.connect(url.render_as_string(hide_password=False), autocommit=True)


def test_the_flusher_stores_every_shape_of_batch_once_and_tells_the_streams(store: Store) -> None:
    """One lease's small batch (the kept connection's statement), a batch of two leases,
    unfenced entries and a batch past the one-statement size: each stored once, in order,
    and each commit's runs handed to ``on_entries``."""
    heard: list[set[str]] = []
    store.on_entries = heard.append
    runs, leases = [], []
    for _ in range(2):
        run = store.create_run("demo")
        lease = store.acquire(run.id, "w", 30)
        assert lease is not None
        runs.append(run)
        leases.append(lease)
    a, b = runs
    flush = store.entry_flusher()
    batches = [
        [entry(a.id, f"a{i}", epoch=leases[0].epoch) for i in range(5)],
        [entry(a.id, "a5", epoch=leases[0].epoch), entry(b.id, "b0", epoch=leases[1].epoch)],
        [entry(b.id, "b1")],
        [entry(b.id, f"b{i}", epoch=leases[1].epoch) for i in range(2, 82)],
    ]
    for batch in batches:
        assert flush(batch) == set()
    assert [e.event for e in store.entries(a.id)] == [f"a{i}" for i in range(6)]
    assert [e.event for e in store.entries(b.id)] == [f"b{i}" for i in range(82)]
    assert heard == [{a.id}, {a.id, b.id}, {b.id}, {b.id}]
    if store.dialect == "postgresql":
        assert flush._pooled is not None, "one lease's small batch goes on the kept connection"


def test_the_flusher_refuses_a_lost_lease_and_stores_none_of_it(store: Store) -> None:
    run = store.create_run("demo")
    old = store.acquire(run.id, "w1", 30)
    assert old is not None
    flush = store.entry_flusher()
    assert flush([entry(run.id, "mine", epoch=old.epoch)]) == set()
    testing.expire_lease(store, run.id)
    assert store.transition(
        run.id, Status.RUNNING, Status.QUEUED, expected_epoch=old.epoch, bump_attempt=True
    )
    new = store.acquire(run.id, "w2", 30)
    assert new is not None
    assert flush([entry(run.id, "late", epoch=old.epoch)]) == {(run.id, old.epoch)}
    assert flush([entry(run.id, "theirs", epoch=new.epoch)]) == set()
    assert [e.event for e in store.entries(run.id)] == ["mine", "theirs"]


def test_the_flusher_keeps_the_entry_cap(store: Store) -> None:
    """Batches that reach the cap fall back to the ordinary path: the same entries dropped,
    the same ``log_truncated`` counts, as through ``append_entries``."""
    run, lease = capped_run(store, 5)
    flush = store.entry_flusher()
    flush([entry(run.id, f"i{i}", epoch=lease.epoch) for i in range(4)])
    flush(
        [entry(run.id, f"j{i}", epoch=lease.epoch) for i in range(4)]
        + [entry(run.id, "warn", epoch=lease.epoch, level=Level.WARNING)]
    )
    flush(
        [
            entry(run.id, "k", epoch=lease.epoch),
            entry(run.id, "err", epoch=lease.epoch, level=Level.ERROR),
        ]
    )
    flush([entry(run.id, "w2", epoch=lease.epoch, level=Level.WARNING)])
    store.finish(lease, Status.SUCCEEDED, [entry(run.id, "run_completed", epoch=lease.epoch)])
    events = [e.event for e in store.entries(run.id)]
    assert events == [
        "i0", "i1", "i2", "i3", "j0", "warn", "log_truncated", "err", "w2", "log_truncated",
        "run_completed",
    ]  # fmt: skip
    first, final = [e for e in store.entries(run.id) if e.event == "log_truncated"]
    assert first.data == {"limit": 5, "dropped": 3, "final": False}
    assert final.data == {"limit": 5, "dropped": 4, "final": True}


def test_a_kept_connection_ended_while_idle_is_replaced_without_an_error(pg_url: str) -> None:
    """A database restart (here: the backend terminated) while the kept connection sat idle:
    the next flush sends its statement again on a fresh connection, stores it once, and
    leaves no transaction open."""
    store = Store(pg_url)
    admin = _admin(store)
    try:
        run = store.create_run("demo")
        lease = store.acquire(run.id, "w", 30)
        assert lease is not None
        flush = store.entry_flusher()
        assert flush([entry(run.id, "before", epoch=lease.epoch)]) == set()
        pid = _kept_pid(flush)
        # With a timeout the call returns once the backend has gone (its socket closed),
        # as a restart's sessions have gone before the next flush; without, it only signals.
        (gone,) = admin.execute("SELECT pg_terminate_backend(%s, 10000)", (pid,)).fetchone()
        assert gone
        assert flush([entry(run.id, "after", epoch=lease.epoch)]) == set()
        assert _kept_pid(flush) != pid
        assert [e.event for e in store.entries(run.id)] == ["before", "after"]
        state = admin.execute(
            "SELECT state FROM pg_stat_activity WHERE pid = %s", (_kept_pid(flush),)
        ).fetchone()
        assert state == ("idle",), "the flush left its transaction open"
    finally:
        admin.close()
        store.close()


def test_closing_the_store_returns_the_kept_connection_as_the_pool_lent_it(pg_url: str) -> None:
    """The kept connection runs in autocommit; back in the pool it is an ordinary
    transactional connection again, and a closed flusher still stores (ordinary path)."""
    store = Store(pg_url)
    run = store.create_run("demo")
    lease = store.acquire(run.id, "w", 30)
    assert lease is not None
    flush = store.entry_flusher()
    flush([entry(run.id, "kept", epoch=lease.epoch)])
    pooled = flush._pooled
    assert pooled is not None and pooled.driver_connection.autocommit
    driver = pooled.driver_connection
    flush.close()
    assert flush._pooled is None
    assert driver.autocommit is False
    assert flush([entry(run.id, "closed", epoch=lease.epoch)]) == set()
    assert flush._pooled is None
    assert [e.event for e in store.entries(run.id)] == ["kept", "closed"]
    store.close()


def test_an_unreachable_store_is_store_unavailable_and_the_writer_keeps_the_batch(
    pg_url: str,
) -> None:
    """A flush with no server to take it raises the store's outage error, which the
    writer keeps the batch for; nothing of the batch is half-stored."""
    store = Store(pg_url)
    run = store.create_run("demo")
    lease = store.acquire(run.id, "w", 30)
    assert lease is not None
    store.close()
    dead = Store(make_url(pg_url).set(port=1).render_as_string(hide_password=False))
    flush = dead.entry_flusher()
    with pytest.raises(StoreUnavailable):
        flush([entry(run.id, "lost", epoch=lease.epoch)])
    dead.close()
    check = Store(pg_url)
    assert check.entries(run.id) == []
    check.close()
