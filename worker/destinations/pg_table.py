"""One slice of the sql destination: its transaction on its table (the claim, the COPY,
schema drift, and the merge upsert); see :mod:`worker.destinations.postgres`."""

from __future__ import annotations

import contextlib
import itertools
import operator
from collections.abc import Iterator
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from worker.dbfaults import is_transient
from worker.destinations.base import SliceKey, SliceStats, WriteSpec
from worker.destinations.pg_schema import (
    _COPY_CONTEXT,
    _INTEGER_TYPES,
    _MERGE_TEMP,
    _SEQ,
    META_COLUMNS,
    _columns_of,
    _exists,
    _key_index,
    _names,
    _slice_index,
    _table_columns,
    pg_type,
    stage_name,
)
from worker.errors import DestinationError, LeaseLost, first_line
from worker.models import Event
from worker.pipelines import WriteMode
from worker.runlog import Logger
from worker.scrub import scrubber
from worker.sources.base import Page, RowPage

if TYPE_CHECKING:
    from worker.destinations.postgres import PostgresDestination


class StagedTable:
    """One slice's open transaction on its table (a replace run's: its staging table)."""

    def __init__(self, dest: PostgresDestination, key: SliceKey, log: Logger) -> None:
        self.dest = dest
        self.key = key
        self.log = log
        self.rows = 0
        self.spec: WriteSpec = key.write
        #: The table users know, named in messages; ``table`` is the one this slice writes.
        self.label = dest.table_name(key.resource)
        replace = self.spec.mode is WriteMode.REPLACE
        self.table = stage_name(self.label, key.run_id) if replace else self.label
        self._schema = dest.config.db_schema
        self._ident = sql.Identifier(self._schema, self.table)
        self._merge = self.spec.mode is WriteMode.MERGE
        #: Where COPY goes: the table itself, or merge's temporary table.
        self._copy_ident = _MERGE_TEMP if self._merge else self._ident
        #: Merge: the temporary table's columns (None until the first page), and whether
        #: the target's unique index on the key was checked.
        self._temp: dict[str, str] | None = None
        self._keyed = False
        self.conn = dest.connection()
        self._stream: contextlib.ExitStack | None = None
        self._stream_columns: list[str] | None = None
        self._stream_base = 0
        self._copy_stream: Any = None
        try:
            self._claim()
            self.columns = self._load_columns()
            if self.columns and not self._merge:  # a merge upserts again instead
                self.conn.execute(
                    sql.SQL(
                        "DELETE FROM {} WHERE _quarry_run_id = %s AND _quarry_slice = %s"
                    ).format(self._ident),
                    (key.run_id, key.index),
                )
        except BaseException:
            self.discard()
            raise

    def _claim(self) -> None:
        row = self.conn.execute(
            sql.SQL(
                "INSERT INTO {}._quarry_slices (dest_table, run_id, slice, epoch)"
                " VALUES (%s, %s, %s, %s)"
                " ON CONFLICT (dest_table, run_id, slice) DO UPDATE"
                " SET epoch = EXCLUDED.epoch, written_at = now(), rows = NULL"
                " WHERE _quarry_slices.epoch <= EXCLUDED.epoch RETURNING epoch"
            ).format(sql.Identifier(self._schema)),
            (self.table, self.key.run_id, self.key.index, self.key.epoch),
        ).fetchone()
        if row is None:
            msg = (
                f"{self.label} slice {self.key.index} of {self.key.run_id} was written "
                f"by a newer lease epoch than {self.key.epoch}"
            )
            raise LeaseLost(msg)

    def _load_columns(self) -> dict[str, str]:
        return _table_columns(self.conn, self._schema, self.table)

    # -- writing --------------------------------------------------------------

    def write(self, rows: Page) -> None:
        """COPY a page into the table under a savepoint; drift is handled first."""
        if not rows:
            return
        names = rows.columns if isinstance(rows, RowPage) else _columns_of(rows)
        clash = [n for n in names if n in META_COLUMNS]
        if clash:
            msg = f"column {clash[0]!r} is reserved for Quarry's bookkeeping"
            raise DestinationError(msg)
        missing = [k for k in self.spec.primary_key if k not in names] if self._merge else []
        if missing:
            msg = f"{self.label}: the rows have no column {missing[0]!r} of the primary key"
            raise DestinationError(msg)
        if isinstance(rows, RowPage) and self._stream_rows(rows, names):
            return
        self._end_stream()
        json = any(self.columns.get(n) == "jsonb" for n in names)
        fast = not json and (isinstance(rows, RowPage) or all(len(r) == len(names) for r in rows))
        try:
            self._evolve(rows, names)
            self._merge_ready()
            for attempt in range(len(names) + 2):
                try:
                    with self.conn.transaction():  # a savepoint: a refused page undoes only itself
                        self._copy(rows, names, fast=fast)
                    break
                except (psycopg.ProgrammingError, TypeError):
                    if not fast:
                        raise
                    fast = False  # an unadaptable value: the careful path names it
                except psycopg.errors.IntegrityError as exc:  # a null key of a merge
                    raise DestinationError(self._locate(exc)) from None
                except psycopg.errors.DataError as exc:
                    if attempt > len(names) or not self._widen_for(exc, rows):
                        raise DestinationError(self._locate(exc)) from None
        except psycopg.Error as exc:
            msg = f"{self.label}: {first_line(exc)}"
            raise DestinationError(scrubber.text(msg), retryable=is_transient(exc)) from None
        self.rows += len(rows)

    def _stream_rows(self, rows: RowPage, names: list[str]) -> bool:
        """Tuples from a SQL source go into one COPY that stays open across pages.

        One COPY per slice lets PostgreSQL work while the next page is fetched (a
        COPY per page waits for the server at every page end). A value the table
        refuses fails the slice naming the row and column; no widening here: a SQL
        source's column types do not change within a slice. False when the page
        needs the per-page path (JSON columns).
        """
        try:
            if names != self._stream_columns:
                self._end_stream()
                self._evolve(rows, names)
                self._merge_ready()
                if any(self.columns.get(n) == "jsonb" for n in names):
                    return False
                statement = sql.SQL("COPY {} ({}) FROM STDIN").format(
                    self._copy_ident, _names([*self._head_columns(), *names])
                )
                stack = contextlib.ExitStack()
                cursor = stack.enter_context(self.conn.cursor())
                self._copy_stream = stack.enter_context(cursor.copy(statement))
                self._stream, self._stream_columns, self._stream_base = stack, names, self.rows
            write_row = self._copy_stream.write_row
            if self._merge:
                seq = self.rows
                for values in rows.tuples:
                    seq += 1
                    write_row((seq, *values))
            else:
                head = (self.key.run_id, self.key.index)
                for values in rows.tuples:
                    write_row(head + tuple(values))
        except (psycopg.errors.DataError, psycopg.errors.IntegrityError) as exc:
            self._abandon_stream()
            raise DestinationError(self._locate(exc, self._stream_base)) from None
        except psycopg.Error as exc:
            self._abandon_stream()
            raise DestinationError(
                scrubber.text(f"{self.label}: {first_line(exc)}"), retryable=is_transient(exc)
            ) from None
        self.rows += len(rows)
        return True

    def _head_columns(self) -> tuple[str, ...]:
        """The columns each copied row starts with: merge's row number, or the bookkeeping."""
        return (_SEQ,) if self._merge else ("_quarry_run_id", "_quarry_slice")

    def _heads(self) -> Iterator[tuple[Any, ...]]:
        """The values each copied row starts with, in row order from the slice's next row."""
        if self._merge:
            return ((n,) for n in itertools.count(self.rows + 1))
        return itertools.repeat((self.key.run_id, self.key.index))

    def _end_stream(self) -> None:
        """Finish an open COPY; the server's verdict on its rows arrives here."""
        stack, self._stream, self._stream_columns = self._stream, None, None
        if stack is None:
            return
        try:
            stack.close()
        except (psycopg.errors.DataError, psycopg.errors.IntegrityError) as exc:
            raise DestinationError(self._locate(exc, self._stream_base)) from None
        except psycopg.Error as exc:
            raise DestinationError(
                scrubber.text(f"{self.label}: {first_line(exc)}"), retryable=is_transient(exc)
            ) from None

    def _abandon_stream(self) -> None:
        stack, self._stream, self._stream_columns = self._stream, None, None
        if stack is not None:
            with contextlib.suppress(Exception):
                stack.__exit__(DestinationError, DestinationError("slice discarded"), None)

    def _copy(self, rows: Page, names: list[str], *, fast: bool) -> None:
        json_columns = [i for i, n in enumerate(names) if self.columns.get(n) == "jsonb"]
        heads = self._heads()
        statement = sql.SQL("COPY {} ({}) FROM STDIN").format(
            self._copy_ident, _names([*self._head_columns(), *names])
        )
        with self.conn.cursor() as cur, cur.copy(statement) as copy:
            if fast and isinstance(rows, RowPage):
                for values, head in zip(
                    rows.tuples, heads, strict=False
                ):  # tuples from a SQL source
                    copy.write_row(head + tuple(values))
                return
            if fast:
                # Every row has every column and none is JSON: C-level tuples, no per-value work.
                take = operator.itemgetter(*names)
                if len(names) == 1:
                    for row, head in zip(rows, heads, strict=False):
                        copy.write_row((*head, take(row)))
                else:
                    for row, head in zip(rows, heads, strict=False):
                        copy.write_row(head + take(row))
                return
            for number, (row, head) in enumerate(zip(rows, heads, strict=False), start=1):
                values = [row.get(n) for n in names]
                for i in json_columns:
                    if isinstance(values[i], dict | list):
                        values[i] = Jsonb(values[i])
                try:
                    copy.write_row((*head, *values))
                except (psycopg.ProgrammingError, TypeError) as exc:
                    column = next(
                        (n for n, v in zip(names, values, strict=True) if not _adaptable(v)),
                        "?",
                    )
                    msg = (
                        f"row {self.rows + number}, column {column!r}: value cannot be "
                        f"serialised ({first_line(exc)})"
                    )
                    raise DestinationError(msg) from None

    def _evolve(self, rows: Page, names: list[str]) -> None:
        """Create the table, or add the page's new columns, before copying."""
        new = [n for n in names if n not in self.columns]
        if not new:
            return
        types = {
            n: next((t for r in rows if (t := pg_type(r.get(n))) is not None), "text") for n in new
        }
        if not self.columns:
            self._create(new, types)
            self.columns = self._load_columns()
            new = [n for n in names if n not in self.columns]  # a concurrent creator's columns
            if not new:
                return
        for name in new:
            self.conn.execute(
                sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} {}").format(
                    self._ident, sql.Identifier(name), sql.SQL(types[name])
                )
            )
        self.columns = self._load_columns()
        if self.rows or self._existed_before(new):
            self.log.warning(
                Event.SCHEMA_CHANGED,
                message=f"Schema changed at row {self.rows + 1} of {self.label}: "
                + ", ".join(f"new column {n!r} ({types[n]})" for n in new),
                table=self.label,
                row=self.rows + 1,
                added_columns=new,
            )

    def _create(self, new: list[str], types: dict[str, str]) -> None:
        """Create the table: a replace run's staging table like its target, if there is one
        (the page's other columns are then added as drift); else from the page's columns."""
        target = sql.Identifier(self._schema, self.label)
        like = self.table != self.label and _exists(self.conn, self._schema, self.label)
        columns = sql.SQL(", ").join(
            sql.SQL("{} {}").format(sql.Identifier(n), sql.SQL(types[n])) for n in new
        )
        # Two runs creating the same new table at once: PostgreSQL's IF NOT EXISTS is not
        # atomic, and the loser's catalog insert fails once the winner commits. The table
        # (and its index) exist then; only the loser's savepoint was undone.
        with contextlib.suppress(psycopg.errors.UniqueViolation):
            self._create_in_savepoint(like, target, columns)

    def _create_in_savepoint(
        self, like: bool, target: sql.Identifier, columns: sql.Composed
    ) -> None:
        with self.conn.transaction():
            if like:
                self.conn.execute(
                    sql.SQL("CREATE TABLE IF NOT EXISTS {} (LIKE {} INCLUDING DEFAULTS)").format(
                        self._ident, target
                    )
                )
            else:
                self.conn.execute(
                    sql.SQL(
                        "CREATE TABLE IF NOT EXISTS {} (_quarry_run_id text NOT NULL,"
                        " _quarry_slice integer NOT NULL,"
                        " _quarry_loaded_at timestamptz NOT NULL DEFAULT now(), {})"
                    ).format(self._ident, columns)
                )
            if not self._merge:  # merge never deletes by slice: no index to keep up
                self.conn.execute(
                    sql.SQL(
                        "CREATE INDEX IF NOT EXISTS {} ON {} (_quarry_run_id, _quarry_slice)"
                    ).format(sql.Identifier(_slice_index(self.table)), self._ident)
                )

    def _existed_before(self, new: list[str]) -> bool:
        # A table that already had data columns: the new ones are drift, not creation.
        return any(c not in META_COLUMNS and c not in new for c in self.columns)

    # -- merge ------------------------------------------------------------------

    def _merge_ready(self) -> None:
        """Merge: the target's unique key index, and a temporary table with its columns."""
        if not self._merge:
            return
        if not self._keyed:
            self._ensure_key()
            self._keyed = True
        wanted = {n: t for n, t in self.columns.items() if n not in META_COLUMNS}
        if self._temp is None:
            key = set(self.spec.primary_key)
            columns = sql.SQL(", ").join(
                sql.SQL("{} {}{}").format(
                    sql.Identifier(n), sql.SQL(t), sql.SQL(" NOT NULL" if n in key else "")
                )
                for n, t in wanted.items()
            )
            self.conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(_MERGE_TEMP))
            self.conn.execute(
                sql.SQL("CREATE TEMP TABLE {} ({} bigint NOT NULL, {}) ON COMMIT DROP").format(
                    _MERGE_TEMP, sql.Identifier(_SEQ), columns
                )
            )
            self._temp = wanted
            return
        for name, kind in wanted.items():
            if name not in self._temp:
                self.conn.execute(
                    sql.SQL("ALTER TABLE {} ADD COLUMN {} {}").format(
                        _MERGE_TEMP, sql.Identifier(name), sql.SQL(kind)
                    )
                )
                self._temp[name] = kind

    def _key_index_found(self) -> bool:
        """Whether the target has a valid unique index on exactly the key's columns (what
        ``ON CONFLICT`` needs)."""
        found = self.conn.execute(
            "SELECT 1 FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid"
            " JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = %s AND c.relname = %s AND i.indisunique AND i.indisvalid"
            " AND i.indpred IS NULL AND i.indexprs IS NULL"
            ' AND (SELECT array_agg(a.attname::text ORDER BY a.attname::text COLLATE "C")'
            "      FROM unnest(i.indkey::int2[]) WITH ORDINALITY k(num, ord)"
            "      JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.num"
            "      WHERE k.ord <= i.indnkeyatts) = %s::text[]",
            (self._schema, self.table, sorted(self.spec.primary_key)),
        ).fetchone()
        return found is not None

    def _ensure_key(self) -> None:
        """Give the target its unique index on the key, unless it has one."""
        if self._key_index_found():
            return
        key = ", ".join(self.spec.primary_key)
        name = _key_index(self.table)
        try:
            with self.conn.transaction():
                self.conn.execute(
                    sql.SQL("CREATE UNIQUE INDEX IF NOT EXISTS {} ON {} ({})").format(
                        sql.Identifier(name), self._ident, _names(self.spec.primary_key)
                    )
                )
        except psycopg.errors.UniqueViolation as exc:
            detail = exc.diag.message_detail or "duplicate keys"
            msg = (
                f"{self.label}: cannot merge on primary_key ({key}): the table already holds "
                f"rows with the same key ({detail.rstrip('.')}); remove the duplicates or "
                "choose another primary_key"
            )
            raise DestinationError(msg) from None
        if not self._key_index_found():
            msg = (
                f"{self.label}: cannot merge on primary_key ({key}): an index named {name} "
                "exists but is not a unique index on those columns"
            )
            raise DestinationError(msg)

    def _upsert(self) -> None:
        """Upsert the temporary table into the target: the last row of each key wins; with
        ``hard_delete``, a key whose last row is flagged deletes the target's row instead."""
        assert self._temp is not None
        columns = list(self._temp)
        key = self.spec.primary_key
        last = sql.SQL(
            "SELECT DISTINCT ON ({key}) {columns} FROM {temp} ORDER BY {key}, {seq} DESC"
        ).format(
            key=_names(key), columns=_names(columns), temp=_MERGE_TEMP, seq=sql.Identifier(_SEQ)
        )
        updates = sql.SQL(", ").join(
            sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(c))
            for c in (*META_COLUMNS, *(c for c in columns if c not in key))
        )
        insert = sql.SQL(
            "INSERT INTO {target} ({all}) SELECT %s, %s, now(), {columns} FROM last{where}"
            " ON CONFLICT ({key}) DO UPDATE SET {updates}"
        )
        parts: dict[str, sql.Composable] = {
            "target": self._ident,
            "all": _names([*META_COLUMNS, *columns]),
            "columns": _names(columns),
            "key": _names(key),
            "updates": updates,
            "where": sql.SQL(""),
        }
        flag_column = self.spec.hard_delete
        if flag_column is None or flag_column not in self._temp:
            # Keys are usually unique within a slice: upsert the rows as they are, and only
            # when a key comes twice (PostgreSQL refuses to update a row twice in one
            # statement) undo that and keep each key's last row, which costs a sort.
            plain = sql.SQL("WITH last AS (SELECT {} FROM {}) ").format(
                _names(columns), _MERGE_TEMP
            )
            try:
                with self.conn.transaction():
                    self.conn.execute(
                        plain + insert.format(**parts), (self.key.run_id, self.key.index)
                    )
                return
            except psycopg.errors.CardinalityViolation:
                pass
            statement = sql.SQL("WITH last AS ({}) ").format(last) + insert.format(**parts)
        else:
            flag: sql.Composable = sql.Identifier("last", flag_column)
            if self._temp[flag_column] != "boolean":
                flag = sql.SQL("CAST(CAST({} AS text) AS boolean)").format(flag)
            parts["where"] = sql.SQL(" WHERE ({}) IS NOT TRUE").format(flag)
            match = sql.SQL(" AND ").join(
                sql.SQL("t.{0} = last.{0}").format(sql.Identifier(k)) for k in key
            )
            statement = sql.SQL(
                "WITH last AS MATERIALIZED ({last}), gone AS ("
                "DELETE FROM {target} AS t USING last WHERE ({flag}) IS TRUE AND {match}) "
            ).format(last=last, target=self._ident, flag=flag, match=match) + insert.format(**parts)
        self.conn.execute(statement, (self.key.run_id, self.key.index))

    # -- drift and errors ---------------------------------------------------------

    def _widen_for(self, exc: psycopg.errors.DataError, rows: Page) -> bool:
        """Widen an integer column that a float (or Decimal) did not fit; True if it did."""
        row, column = self._where(exc)
        if row is None or column is None or self.columns.get(column) not in _INTEGER_TYPES:
            return False
        value = rows[row - 1].get(column) if 0 < row <= len(rows) else None
        target = (
            "double precision"
            if isinstance(value, float)
            else "numeric"
            if isinstance(value, Decimal)
            else None
        )
        if target is None:
            return False
        tables = [self._ident]
        if self._temp is not None and column in self._temp:  # merge copies into its twin
            tables.append(_MERGE_TEMP)
            self._temp[column] = target
        for table in tables:
            self.conn.execute(
                sql.SQL("ALTER TABLE {} ALTER COLUMN {} TYPE {}").format(
                    table, sql.Identifier(column), sql.SQL(target)
                )
            )
        self.log.warning(
            Event.SCHEMA_CHANGED,
            message=(
                f"Schema changed at row {self.rows + row} of {self.label}: "
                f"{column!r} widened {self.columns[column]} -> {target}"
            ),
            table=self.label,
            row=self.rows + row,
            widened_columns={column: f"{self.columns[column]} -> {target}"},
        )
        self.columns = self._load_columns()
        return True

    @staticmethod
    def _where(exc: psycopg.Error) -> tuple[int | None, str | None]:
        found = _COPY_CONTEXT.search(exc.diag.context or "")
        if found is None:
            return None, None
        return int(found.group(1)), (found.group(2) or None)

    def _locate(self, exc: psycopg.Error, base: int | None = None) -> str:
        row, column = self._where(exc)
        problem = exc.diag.message_primary or first_line(exc)
        null = exc.diag.column_name if isinstance(exc, psycopg.errors.NotNullViolation) else None
        if self._merge and null in self.spec.primary_key:
            column, problem = null, "a primary key column is null"
        if row is None:
            return f"{self.label}: {problem}"
        where = f"row {(self.rows if base is None else base) + row}" + (
            f", column {column!r}" if column else ""
        )
        return f"{where}: {problem}"

    # -- the slice's end ------------------------------------------------------

    def seal(self) -> SliceStats:
        """End the COPY (merge: upsert), record the row count on the slice's claim; the
        transaction stays open."""
        self._end_stream()
        try:
            if self._temp is not None:
                self._upsert()
            self.conn.execute(
                sql.SQL(
                    "UPDATE {}._quarry_slices SET rows = %s"
                    " WHERE dest_table = %s AND run_id = %s AND slice = %s"
                ).format(sql.Identifier(self._schema)),
                (self.rows, self.table, self.key.run_id, self.key.index),
            )
        except psycopg.Error as exc:
            raise DestinationError(
                scrubber.text(f"{self.label}: {first_line(exc)}"), retryable=is_transient(exc)
            ) from None
        return SliceStats(rows=self.rows, files=0, bytes=0)

    def publish(self) -> None:
        """Commit: the slice's rows replace its earlier attempt's (merge: its upserts land),
        all at once."""
        self.conn.commit()

    def discard(self) -> None:
        """Roll back; a broken connection is closed and reopened by the next slice."""
        self._abandon_stream()
        try:
            self.conn.rollback()
        except psycopg.Error:
            with contextlib.suppress(psycopg.Error):
                self.conn.close()


def _adaptable(value: Any) -> bool:
    return value is None or pg_type(value) != "text" or isinstance(value, str)
