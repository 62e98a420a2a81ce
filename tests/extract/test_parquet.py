"""Parquet slice files: round trip, atomic publish, and the documented schema-drift rules."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.extract.conftest import RecordingLog
from worker.destinations import SliceKey, build_destination
from worker.destinations.files import FilesDestination
from worker.destinations.parquet import ROW_GROUP_ROWS
from worker.errors import ConfigError, DestinationError

KEY = SliceKey("pipe", "run_1", "orders", 3, epoch=2)


def dest(tmp_path: Path) -> FilesDestination:
    d = build_destination(
        "files", {"format": "parquet", "path": str(tmp_path)}, tmp_path / "unused"
    )
    assert isinstance(d, FilesDestination)
    return d


def final(tmp_path: Path) -> Path:
    return tmp_path / "pipe" / "run_1" / "orders" / "orders-00003.parquet"


def test_round_trip_is_invisible_until_publish(tmp_path: Path, log: RecordingLog) -> None:
    """Rows keep their types; nothing is visible before publish; several row groups."""
    staged = dest(tmp_path).stage(KEY, log)
    at = datetime(2026, 1, 1, tzinfo=UTC)
    rows = [
        {
            "id": i,
            "at": at,
            "amount": Decimal("1.25"),
            "ok": i % 2 == 0,
            "tags": ["a"],
            "meta": {"k": i},
        }
        for i in range(2 * ROW_GROUP_ROWS)
    ]
    for start in range(0, len(rows), 10_000):
        staged.write(rows[start : start + 10_000])
    stats = staged.seal()
    assert not final(tmp_path).exists()
    staged.publish()
    table = pq.read_table(final(tmp_path))
    assert stats.rows == table.num_rows == len(rows) and stats.files == 1 and stats.bytes > 0
    assert table.slice(5, 1).to_pylist() == [rows[5]]
    assert pq.ParquetFile(final(tmp_path)).num_row_groups >= 2  # bounded buffering
    assert log.records == []
    assert list(tmp_path.rglob("*.tmp*")) == []


def test_a_new_column_and_a_widening_are_kept_and_logged(tmp_path: Path, log: RecordingLog) -> None:
    """Earlier rows read null in the new column; int widens to float; one warning each time."""
    staged = dest(tmp_path).stage(KEY, log)
    staged.write([{"id": 1, "score": 3}, {"id": 2, "score": 4}])
    staged._flush()  # the first rows are already in the file when the schema changes
    staged.write([{"id": 3, "score": 4.5, "country": "NL"}])
    staged.seal()
    staged.publish()
    assert pq.read_table(final(tmp_path)).to_pylist() == [
        {"id": 1, "score": 3.0, "country": None},
        {"id": 2, "score": 4.0, "country": None},
        {"id": 3, "score": 4.5, "country": "NL"},
    ]
    (change,) = log.events("schema_changed")
    assert change["added_columns"] == ["country"]
    assert change["widened_columns"] == {"score": "int64 -> double"}
    assert change["row"] == 3


def test_an_incompatible_type_change_fails_naming_column_and_row(
    tmp_path: Path, log: RecordingLog
) -> None:
    """int then string across pages: the slice fails; row numbers count from the slice start."""
    staged = dest(tmp_path).stage(KEY, log)
    staged.write([{"id": 1, "zip": 1234}, {"id": 2, "zip": 5678}])
    with pytest.raises(
        DestinationError, match=r"^row 4, column 'zip': type changed from int64 to string"
    ):
        staged.write([{"id": 3, "zip": None}, {"id": 4, "zip": "1234AB"}])
    staged.discard()
    assert list(tmp_path.rglob("*.parquet*")) == []


def test_a_value_that_cannot_be_stored_names_column_and_row(
    tmp_path: Path, log: RecordingLog
) -> None:
    """Mixed types inside one page, or an object Arrow cannot hold: the column and row."""
    staged = dest(tmp_path).stage(KEY, log)
    staged.write([{"id": 1}])
    with pytest.raises(DestinationError, match=r"^row 4, column 'v': a str value"):
        staged.write([{"id": 2, "v": 1}, {"id": 3, "v": 2}, {"id": 4, "v": "x"}])
    with pytest.raises(DestinationError, match=r"^row 2, column 'v': a object value"):
        staged.write([{"id": 2, "v": object()}])
    staged.discard()


def test_an_empty_slice_is_an_empty_file(tmp_path: Path, log: RecordingLog) -> None:
    """A window with no rows still publishes its (empty) file: the slice is done."""
    staged = dest(tmp_path).stage(KEY, log)
    assert staged.seal().rows == 0
    staged.publish()
    assert pq.read_table(final(tmp_path)).num_rows == 0


def test_a_redone_slice_replaces_the_file_and_old_temps_go(
    tmp_path: Path, log: RecordingLog
) -> None:
    """A killed epoch's temp file is removed by the next epoch; the rename replaces."""
    d = dest(tmp_path)
    killed = d.stage(KEY, log)
    killed.write([{"id": 1}])
    killed._flush()
    retry = d.stage(SliceKey("pipe", "run_1", "orders", 3, epoch=3), log)
    assert not killed.temp.exists()
    retry.write([{"id": 1}, {"id": 2}])
    retry.seal()
    retry.publish()
    assert pq.read_table(final(tmp_path)).num_rows == 2


def test_format_is_validated(tmp_path: Path) -> None:
    """An unknown format names the field."""
    with pytest.raises(ConfigError, match=r"destination\.format"):
        build_destination("files", {"format": "csv"}, tmp_path)
