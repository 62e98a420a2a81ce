"""The rows the SQLite entry insert sends: timestamps as SQLAlchemy stores them, and the
split of a batch into the few prepared statement sizes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from hypothesis import given
from hypothesis import strategies as st

from worker.store.entries import SQLITE_ROWS_PER_INSERT, _sqlite_chunks, _utc_text

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
