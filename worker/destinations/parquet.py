"""Parquet slice files, with schema drift handled in one documented way.

One Parquet file per slice, written under a temporary name and renamed on
publish (see :mod:`worker.destinations.files`). Pages are buffered into row
groups of about ``ROW_GROUP_ROWS`` rows, so memory is bounded by one row group
whatever the slice's size.

Schema drift inside a slice (the file's schema is the first page's):

- a **new column** is kept: the file is widened (earlier rows read null) and a
  ``schema_changed`` warning names the column;
- a **type change** that widens without loss (int → float, int → decimal,
  null → anything, struct fields added) widens the column, with a warning;
- any other type change, or a value Arrow cannot store, **fails the slice**
  with an error naming the column and the row (1-based within the slice);
  no row is ever silently dropped or nulled.

Each slice file has its own schema; readers that scan many files unify them
(``pyarrow.dataset`` with ``promote_options="permissive"``, DuckDB
``union_by_name``).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from worker.destinations.base import SliceStats
from worker.destinations.files import temp_path
from worker.errors import DestinationError, first_line
from worker.models import Event
from worker.runlog import Logger
from worker.sources.base import Page, Row, RowPage

#: Rows per row group: large enough for good compression and scans, small enough for memory.
ROW_GROUP_ROWS = 65_536

_ARROW_ERRORS = (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError)


def to_table(page: Page, first_row: int) -> pa.Table:
    """A page as an Arrow table; an unstorable value fails naming its column and row."""
    try:
        if isinstance(page, RowPage):  # columns straight from the tuples: no dict per row
            columns = zip(*page.tuples, strict=True)
            arrays = [pa.array(values) for values in columns]
            return pa.Table.from_arrays(arrays, names=page.columns)
        return pa.Table.from_pylist(list(page))
    except _ARROW_ERRORS as exc:
        raise DestinationError(_locate(list(page), first_row, exc)) from None


def _locate(page: list[Row], first_row: int, exc: Exception) -> str:
    columns = list(dict.fromkeys(key for row in page for key in row))
    for column in columns:
        values = [row.get(column) for row in page]
        try:
            pa.array(values)
        except _ARROW_ERRORS:
            # The shortest failing prefix ends at the first value that does not fit.
            lo, hi = 0, len(values) - 1
            while lo < hi:
                mid = (lo + hi) // 2
                try:
                    pa.array(values[: mid + 1])
                except _ARROW_ERRORS:
                    hi = mid
                else:
                    lo = mid + 1
            kind = type(values[lo]).__name__
            return (
                f"row {first_row + lo}, column {column!r}: a {kind} value that cannot be "
                "stored with the column's earlier values in this page"
            )
    return f"rows {first_row}-{first_row + len(page) - 1}: {first_line(exc)}"


def _fit(table: pa.Table, schema: pa.Schema, first_row: int) -> pa.Table:
    """``table`` with ``schema``'s columns, in order: missing ones null, each cast losslessly."""
    arrays = []
    for field in schema:
        if field.name not in table.column_names:
            arrays.append(pa.nulls(table.num_rows, field.type))
            continue
        column = table[field.name]
        if column.type.equals(field.type):
            arrays.append(column)
            continue
        try:
            arrays.append(column.cast(field.type, safe=True))
        except _ARROW_ERRORS:
            values = column.to_pylist()
            row = next(
                (i for i, v in enumerate(values) if not _casts(v, column.type, field.type)), 0
            )
            msg = (
                f"row {first_row + row}, column {field.name!r}: {column.type} value does not "
                f"fit the column's type {field.type} without loss"
            )
            raise DestinationError(msg) from None
    return pa.Table.from_arrays(arrays, schema=schema)


def _casts(value: Any, source: pa.DataType, target: pa.DataType) -> bool:
    try:
        pa.array([value], type=source).cast(target, safe=True)
    except _ARROW_ERRORS:
        return False
    return True


class StagedParquet:
    """A Parquet slice file being written under a temporary name."""

    def __init__(self, final: Path, epoch: int, log: Logger) -> None:
        self.final = final
        self.temp = temp_path(final, epoch)
        self.log = log
        self.schema: pa.Schema | None = None
        self._writer: pq.ParquetWriter | None = None
        self._buffer: list[pa.Table] = []
        self._buffered = 0
        self.rows = 0

    def write(self, rows: Page) -> None:
        """Add a page of rows (converted now, written a row group at a time)."""
        if not rows:
            return
        first_row = self.rows + 1
        table = to_table(rows, first_row)
        if self.schema is None:
            self.schema = table.schema
        elif not table.schema.equals(self.schema):
            table = self._conform(table, first_row)
        self._buffer.append(table)
        self._buffered += table.num_rows
        self.rows += table.num_rows
        if self._buffered >= ROW_GROUP_ROWS:
            self._flush()

    def _conform(self, table: pa.Table, first_row: int) -> pa.Table:
        assert self.schema is not None
        current = self.schema
        try:
            unified = pa.unify_schemas([current, table.schema], promote_options="permissive")
        except _ARROW_ERRORS:
            raise DestinationError(self._conflict(table, first_row)) from None
        if not unified.equals(current):
            added = [name for name in unified.names if name not in current.names]
            changed = {
                name: f"{current.field(name).type} -> {unified.field(name).type}"
                for name in current.names
                if not current.field(name).type.equals(unified.field(name).type)
                and current.field(name).type != pa.null()
            }
            self._widen(unified)
            if added or changed:
                self.log.warning(
                    Event.SCHEMA_CHANGED,
                    message=(
                        f"Schema changed at row {first_row} of {self.final.name}: "
                        + ", ".join(
                            [*(f"new column {n!r}" for n in added)]
                            + [f"{n!r} widened {c}" for n, c in changed.items()]
                        )
                    ),
                    file=self.final.name,
                    row=first_row,
                    added_columns=added,
                    widened_columns=changed,
                )
        return _fit(table, unified, first_row)

    def _conflict(self, table: pa.Table, first_row: int) -> str:
        assert self.schema is not None
        for field in table.schema:
            if field.name not in self.schema.names:
                continue
            old = self.schema.field(field.name)
            try:
                pa.unify_schemas(
                    [pa.schema([old]), pa.schema([field])], promote_options="permissive"
                )
            except _ARROW_ERRORS:
                values = table[field.name].to_pylist()
                row = next((i for i, v in enumerate(values) if v is not None), 0)
                return (
                    f"row {first_row + row}, column {field.name!r}: type changed from "
                    f"{old.type} to {field.type}, which cannot be kept in one Parquet column"
                )
        return f"rows from {first_row}: the page's schema cannot be merged with the file's"

    def _widen(self, unified: pa.Schema) -> None:
        """Rewrite what is written so far with ``unified``: row group by row group."""
        self._buffer = [_fit(t, unified, 1) for t in self._buffer]
        if self._writer is not None:
            self._writer.close()
            previous = self.temp.with_name(self.temp.name + ".old")
            self.temp.replace(previous)
            try:
                reader = pq.ParquetFile(previous)
                self._writer = pq.ParquetWriter(self.temp, unified)
                for group in range(reader.num_row_groups):
                    self._writer.write_table(_fit(reader.read_row_group(group), unified, 1))
            finally:
                previous.unlink(missing_ok=True)
        self.schema = unified

    def _flush(self) -> None:
        if not self._buffer:
            return
        assert self.schema is not None
        if self._writer is None:
            self._writer = pq.ParquetWriter(self.temp, self.schema)
        self._writer.write_table(pa.concat_tables(self._buffer))
        self._buffer, self._buffered = [], 0

    def seal(self) -> SliceStats:
        """Write the last row group, close the file and fsync it."""
        try:
            if self.schema is None:
                pq.write_table(pa.table({}), self.temp)  # an empty slice is an empty file
            else:
                self._flush()
                if self._writer is not None:
                    self._writer.close()
                    self._writer = None
        except _ARROW_ERRORS as exc:
            msg = f"{self.final.name}: cannot write Parquet: {first_line(exc)}"
            raise DestinationError(msg) from None
        fd = os.open(self.temp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return SliceStats(rows=self.rows, files=1, bytes=self.temp.stat().st_size)

    def publish(self) -> None:
        """Rename over the final name: readers see the old file or the whole new one."""
        self.temp.replace(self.final)

    def discard(self) -> None:
        """Close and delete the temporary file."""
        if self._writer is not None:
            with contextlib.suppress(Exception):
                self._writer.close()
        self._buffer = []
        self.temp.unlink(missing_ok=True)
        self.temp.with_name(self.temp.name + ".old").unlink(missing_ok=True)
