"""The rows the SQLite entry insert sends: timestamps as SQLAlchemy stores them, and the
split of a batch into the few prepared statement sizes a connection's limit allows."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import event

from worker.models import Level, NewEntry
from worker.store import Store
from worker.store.entries import (
    SQLITE_ROWS_PER_INSERT,
    _sqlite_chunks,
    _sqlite_rows_per_insert,
    _utc_text,
)

_ZONES = st.sampled_from(
    [UTC, timezone(timedelta(hours=5, minutes=30)), timezone(-timedelta(hours=8))]
)


@given(st.datetimes(min_value=datetime(1970, 1, 2), timezones=_ZONES))
def test_timestamps_are_stored_as_naive_utc_text_with_microseconds(value: datetime) -> None:
    """``_utc_text`` (cached by second) agrees with ``isoformat`` for any aware time."""
    assert _utc_text(value) == value.astimezone(UTC).isoformat(" ", "microseconds")[:26]


@given(st.integers(min_value=0, max_value=20_000))
def test_a_batch_is_cut_into_power_of_two_inserts_in_order(count: int) -> None:
    """Every row once, in order, in statements of a handful of sizes."""
    chunks = list(_sqlite_chunks(count))
    assert sum(size for _, size in chunks) == count
    assert [start for start, _ in chunks] == [
        sum(size for _, size in chunks[:i]) for i in range(len(chunks))
    ]
    sizes = {size for _, size in chunks}
    assert all(size & (size - 1) == 0 and size <= SQLITE_ROWS_PER_INSERT for size in sizes)
    assert len(chunks) <= count // SQLITE_ROWS_PER_INSERT + SQLITE_ROWS_PER_INSERT.bit_length()


def test_a_connection_with_a_lower_parameter_limit_gets_fewer_rows_a_statement(
    tmp_path: Path,
) -> None:
    """Where SQLite allows 999 parameters (older than 3.32, or built so), a batch of 3,000
    still goes in, in order, 64 rows a statement."""
    store = Store(f"sqlite:///{tmp_path / 'limited.db'}")
    event.listen(
        store.engine,
        "connect",
        lambda driver, _record: driver.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 999),
    )
    store.upgrade()
    try:
        with store.engine.connect() as conn:
            driver = conn.connection.driver_connection
            assert driver.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) == 999
            assert _sqlite_rows_per_insert(driver) == 64
        run = store.create_run("demo")
        now = datetime.now(UTC)
        store.append_entries(
            [NewEntry(run.id, Level.INFO, f"e{i}", f"m{i}", now) for i in range(3000)]
        )
        events = [e.event for e in store.entries(run.id, limit=5000)]
        assert events == [f"e{i}" for i in range(3000)]
    finally:
        store.close()
