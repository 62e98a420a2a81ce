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

``merge`` resources are compacted here (:func:`compact`) at the run's end: the
published set and the run's slice files become one set with one row per
primary key, written as ``part-00000.parquet``, ``part-00001.parquet``, … of at
most ``PART_ROWS`` rows each, plus a ``_quarry_run_id`` column naming the run
that last wrote each row. Schemas are unified permissively (a new column reads
null in older rows; int widens to float); a type change that cannot be unified
fails the run naming the column.

Memory bound of compaction: the whole published set and all of the run's rows
are held in Arrow memory at once, plus the merged result (a copy of the rows
kept): about twice the resource's uncompressed data, in the worker that ends
the run. Size that worker for it; a resource that outgrows it belongs in a
table destination (``sql``), which merges in the database.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from worker.destinations.base import SliceStats
from worker.destinations.files import fsync_path, publish_file, temp_path, write_failed
from worker.errors import DestinationError, first_line
from worker.models import Event
from worker.runlog import Logger
from worker.sources.base import Page, Row, RowPage

#: Rows per row group: large enough for good compression and scans, small enough for memory.
ROW_GROUP_ROWS = 65_536
#: Most rows in one file of a merged set: bounds each part file's size.
PART_ROWS = 1_048_576
#: The merged set's column naming the run that last wrote each row.
RUN_ID_COLUMN = "_quarry_run_id"
#: A row's position while merging (never written).
_SEQ = "__quarry_seq"

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


def schema_changes(before: pa.Schema, after: pa.Schema) -> tuple[list[str], dict[str, str]]:
    """What widening ``before`` into ``after`` did: the new columns, and each column whose
    type widened (``"int64 -> double"``; a null column taking a type is not a change)."""
    added = [name for name in after.names if name not in before.names]
    changed = {
        name: f"{before.field(name).type} -> {after.field(name).type}"
        for name in before.names
        if not before.field(name).type.equals(after.field(name).type)
        and before.field(name).type != pa.null()
    }
    return added, changed


def describe_changes(added: list[str], changed: dict[str, str]) -> str:
    """``new column 'zip', 'amount' widened int64 -> double``, for a ``schema_changed`` entry."""
    return ", ".join(
        [f"new column {n!r}" for n in added] + [f"{n!r} widened {c}" for n, c in changed.items()]
    )


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
            added, changed = schema_changes(current, unified)
            self._widen(unified)
            if added or changed:
                self.log.warning(
                    Event.SCHEMA_CHANGED,
                    message=(
                        f"Schema changed at row {first_row} of {self.final.name}: "
                        + describe_changes(added, changed)
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
        except OSError as exc:
            raise write_failed(self.final, exc) from None
        try:
            fsync_path(self.temp)
        except OSError as exc:
            raise write_failed(self.final, exc) from None
        return SliceStats(rows=self.rows, files=1, bytes=self.temp.stat().st_size)

    def publish(self) -> None:
        """Rename over the final name: readers see the old file or the whole new one (a second
        call, a checkpoint retried after a store outage, does nothing)."""
        publish_file(self.temp, self.final)

    def discard(self) -> None:
        """Close and delete the temporary file."""
        if self._writer is not None:
            with contextlib.suppress(Exception):
                self._writer.close()
        self._buffer = []
        self.temp.unlink(missing_ok=True)
        self.temp.with_name(self.temp.name + ".old").unlink(missing_ok=True)


@dataclass(frozen=True, slots=True)
class MergeStats:
    """What a compaction wrote."""

    #: Rows in the merged set (one per primary key).
    rows: int
    #: Part files written.
    parts: int
    #: Keys dropped because their winning row's ``hard_delete`` is true (published or not).
    deleted: int


def _read(path: Path, what: str) -> pa.Table:
    try:
        return pq.read_table(path)
    except (OSError, *_ARROW_ERRORS) as exc:
        msg = f"cannot read {what} {path}: {first_line(exc)}"
        raise DestinationError(msg) from None


def _first_null(column: pa.ChunkedArray) -> int | None:
    """The 0-based position of the first null in ``column``, or None."""
    if column.null_count == 0:
        return None
    position: int = pc.index(pc.is_null(column), True).as_py()
    return position


def _change_set(
    files: Sequence[Path], run_id: str, primary_key: Sequence[str], resource: str
) -> list[pa.Table]:
    """The run's slice files as tables, in order, each with the run id column."""
    tables = []
    for path in files:
        table = _read(path, "slice file")
        if table.num_columns == 0:
            continue  # an empty slice
        for column in primary_key:
            if column not in table.column_names:
                msg = (
                    f"{resource}: primary_key column {column!r} is missing from {path.name} "
                    "(a merge needs every key column in every row)"
                )
                raise DestinationError(msg)
            null = _first_null(table[column])
            if null is not None:
                msg = (
                    f"{resource}: primary_key column {column!r} is null in row {null + 1} "
                    f"of {path.name} (a merge needs every key column in every row)"
                )
                raise DestinationError(msg)
        if RUN_ID_COLUMN in table.column_names:
            table = table.drop_columns([RUN_ID_COLUMN])
        tables.append(table.append_column(RUN_ID_COLUMN, pa.repeat(run_id, table.num_rows)))
    return tables


def _published_set(
    directory: Path | None, primary_key: Sequence[str], resource: str
) -> list[pa.Table]:
    """The currently published set's files as tables, in order."""
    if directory is None or not directory.is_dir():
        return []
    files = sorted(
        p for p in directory.iterdir() if p.suffix == ".parquet" and not p.name.startswith(".")
    )
    tables = [_read(p, "published file") for p in files]
    tables = [t for t in tables if t.num_columns]
    for column in primary_key:
        if tables and all(column not in t.column_names for t in tables):
            msg = (
                f"{resource}: the published set {directory} has no column {column!r}; was "
                "primary_key changed? Remove the resource's latest/ link to start afresh"
            )
            raise DestinationError(msg)
    return tables


def _unify(
    published: list[pa.Table], changes: list[pa.Table], resource: str, log: Logger
) -> pa.Schema:
    """One schema for every table (permissive); logs columns the run adds or widens."""
    tables = published + changes
    try:
        unified = pa.unify_schemas([t.schema for t in tables], promote_options="permissive")
    except _ARROW_ERRORS:
        seen: dict[str, pa.DataType] = {}
        for table in tables:
            for field in table.schema:
                old = seen.setdefault(field.name, field.type)
                try:
                    pa.unify_schemas(
                        [pa.schema([(field.name, old)]), pa.schema([field])],
                        promote_options="permissive",
                    )
                except _ARROW_ERRORS:
                    msg = (
                        f"{resource}: column {field.name!r} is {old} in one file and "
                        f"{field.type} in another, which cannot be merged into one column"
                    )
                    raise DestinationError(msg) from None
        raise  # unreachable in practice: some pair of fields conflicts
    if published and log is not None:
        before = pa.unify_schemas([t.schema for t in published], promote_options="permissive")
        added, changed = schema_changes(before, unified)
        if added or changed:
            log.warning(
                Event.SCHEMA_CHANGED,
                message=(
                    f"Schema of the merged set of {resource} changed: "
                    + describe_changes(added, changed)
                ),
                resource=resource,
                added_columns=added,
                widened_columns=changed,
            )
    return unified


def _deduplicate(table: pa.Table, primary_key: Sequence[str], resource: str) -> pa.Table:
    """The last row of each key, in the order those last rows came."""
    if table.num_rows == 0:
        return table
    positions = pc.subtract(
        pc.cumulative_sum(pa.repeat(pa.scalar(1, pa.int64()), table.num_rows)), 1
    )
    try:
        last = (
            table.select(list(primary_key))
            .append_column(_SEQ, positions)
            .group_by(list(primary_key))
            .aggregate([(_SEQ, "max")])
        )
    except _ARROW_ERRORS as exc:
        msg = f"{resource}: cannot merge on primary_key {list(primary_key)}: {first_line(exc)}"
        raise DestinationError(msg) from None
    winners = last[f"{_SEQ}_max"]
    return table.take(pc.take(winners, pc.sort_indices(winners)))


def _drop_deleted(table: pa.Table, hard_delete: str | None, resource: str) -> tuple[pa.Table, int]:
    """``table`` without the rows whose ``hard_delete`` column is true; how many went."""
    if hard_delete is None or hard_delete not in table.column_names:
        return table, 0
    flags = table[hard_delete]
    if flags.type == pa.null():
        return table, 0
    if not pa.types.is_boolean(flags.type):
        msg = f"{resource}: hard_delete column {hard_delete!r} is {flags.type}, not boolean"
        raise DestinationError(msg)
    doomed = pc.fill_null(flags, False)
    deleted = int(pc.sum(doomed.cast(pa.int64())).as_py() or 0)
    return table.filter(pc.invert(doomed)), deleted


def compact(
    published: Path | None,
    changes: Sequence[Path],
    out: Path,
    *,
    run_id: str,
    primary_key: Sequence[str],
    hard_delete: str | None,
    epoch: int,
    resource: str,
    log: Logger,
) -> MergeStats:
    """Merge a run's slice files onto the published set; write the result to ``out``.

    ``published`` is the directory of the current set (None: the first merge);
    ``changes`` are the run's slice files in slice order. One row per
    ``primary_key`` is kept: the run's rows win over the published ones, and
    within the run a later file, then a later row, wins. Keys whose
    ``hard_delete`` column is true are dropped. The result, with a
    ``RUN_ID_COLUMN``, is written under a temporary name next to ``out``, in
    parts of at most ``PART_ROWS`` rows, fsync'd, then renamed to ``out``
    (replacing an unpublished earlier attempt). Holds everything in memory:
    see the module docstring.
    """
    base = _published_set(published, primary_key, resource)
    delta = _change_set(changes, run_id, primary_key, resource)
    tables = base + delta
    if tables:
        schema = _unify(base, delta, resource, log)
        order = [n for n in schema.names if n != RUN_ID_COLUMN]
        order += [RUN_ID_COLUMN] if RUN_ID_COLUMN in schema.names else []
        try:
            combined = pa.concat_tables(tables, promote_options="permissive").select(order)
        except _ARROW_ERRORS as exc:
            msg = f"{resource}: cannot combine the published set and the run: {first_line(exc)}"
            raise DestinationError(msg) from None
        merged, deleted = _drop_deleted(
            _deduplicate(combined, primary_key, resource), hard_delete, resource
        )
    else:
        merged, deleted = None, 0
    temp = temp_path(out, epoch)  # also removes older epochs' interrupted attempts
    shutil.rmtree(temp, ignore_errors=True)
    temp.mkdir()
    parts = 0
    part_rows = max(PART_ROWS, 1)
    try:
        if merged is not None:
            for start in range(0, max(merged.num_rows, 1), part_rows):
                path = temp / f"part-{parts:05d}.parquet"
                pq.write_table(merged.slice(start, part_rows), path, row_group_size=ROW_GROUP_ROWS)
                fsync_path(path)
                parts += 1
    except _ARROW_ERRORS as exc:
        shutil.rmtree(temp, ignore_errors=True)
        msg = f"{resource}: cannot write the merged set: {first_line(exc)}"
        raise DestinationError(msg) from None
    fsync_path(temp)
    shutil.rmtree(out, ignore_errors=True)  # an earlier, never published attempt
    temp.rename(out)
    fsync_path(out.parent)
    return MergeStats(rows=0 if merged is None else merged.num_rows, parts=parts, deleted=deleted)
