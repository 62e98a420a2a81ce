"""The SQL destination: a PostgreSQL table per resource, each slice in one transaction.

A slice's transaction first claims the slice in ``_quarry_slices`` under the
writer's lease epoch (a row lock that serialises writers of the same slice;
an older epoch than the one recorded is refused with :class:`LeaseLost`), then
deletes the rows an earlier attempt of the slice left, then streams the pages
in with ``COPY``. It commits inside the run's fenced checkpoint transaction,
so a redone slice replaces its rows and a stale lease cannot write.

Every row carries ``_quarry_run_id`` and ``_quarry_slice`` (indexed) and
``_quarry_loaded_at``. The table is created from the first page's values if it
is absent. Schema drift:

- a **new column** is added (``ALTER TABLE … ADD COLUMN``) and logged as
  ``schema_changed``;
- a float arriving in an integer column **widens** it to ``double precision``
  (a ``Decimal``: to ``numeric``), logged;
- any other value is passed to PostgreSQL as is, which **coerces** what it can
  (``"42"`` into a ``bigint`` column) — and where it cannot, the slice
  **fails** with an error naming the row (1-based within the slice) and the
  column; nothing of the slice is committed.
"""

from __future__ import annotations

import contextlib
import operator
import re
import uuid
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from worker.destinations.base import Publish, RunScope, SliceKey, SliceStats
from worker.errors import ConfigError, DestinationError, LeaseLost, first_line
from worker.models import Event
from worker.pipelines import parse_options
from worker.runlog import Logger
from worker.scrub import scrubber
from worker.sources.base import Page, RowPage

#: Per-row bookkeeping columns; a user column must not use these names.
META_COLUMNS = ("_quarry_run_id", "_quarry_slice", "_quarry_loaded_at")
_INTEGER_TYPES = {"smallint", "integer", "bigint"}
_COPY_CONTEXT = re.compile(r"line (\d+)(?:, column ([^:]+))?")


class PostgresConfig(BaseModel):
    """The ``[destination]`` table of a SQL destination."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    url: str
    db_schema: str = Field(default="public", alias="schema")
    #: The table name; ``{resource}`` is replaced by the resource's name.
    table: str = "{resource}"


#: Column types for new columns, by the first non-null value's Python type (first match).
_PG_TYPES: tuple[tuple[type | tuple[type, ...], str], ...] = (
    (bool, "boolean"),  # before int: a bool is an int
    (int, "bigint"),
    (float, "double precision"),
    (Decimal, "numeric"),
    (datetime, "timestamp"),  # before date; timestamptz when aware, below
    (date, "date"),
    (time, "time"),
    (timedelta, "interval"),
    ((bytes, bytearray, memoryview), "bytea"),
    (uuid.UUID, "uuid"),
    ((dict, list), "jsonb"),
)


def pg_type(value: Any) -> str | None:
    """The column type a new column gets from its first non-null value (``text`` otherwise)."""
    if value is None:
        return None
    for kind, name in _PG_TYPES:
        if isinstance(value, kind):
            aware = isinstance(value, datetime) and value.tzinfo is not None
            return "timestamptz" if aware else name
    return "text"


def _columns_of(page: Page) -> list[str]:
    """The page's column names: the first row's order, then later arrivals."""
    names = list(page[0])
    later = set().union(*page) - set(names)
    for row in page if later else ():
        for key in row:
            if key in later:
                names.append(key)
                later.discard(key)
    return names


class PostgresDestination:
    """Writes each resource to a PostgreSQL table, one transaction per slice."""

    def __init__(self, config: PostgresConfig) -> None:
        try:
            url = make_url(config.url)
        except ArgumentError:
            msg = "destination.url: not a database URL"
            raise ConfigError(msg) from None
        if url.get_backend_name() != "postgresql":
            msg = f"destination.url: the sql destination writes to PostgreSQL, not {url.drivername}"
            raise ConfigError(msg)
        if "{resource}" not in config.table and "{" in config.table:
            msg = "destination.table: the only placeholder is {resource}"
            raise ConfigError(msg)
        self.config = config
        self.url = url
        scrubber.register([url.password if isinstance(url.password, str) else None])
        self._conninfo: dict[str, Any] = {
            "host": url.host,
            "port": url.port,
            "user": url.username,
            "password": url.password,
            "dbname": url.database,
            **{k: v for k, v in url.query.items() if isinstance(v, str)},
        }
        self._conn: psycopg.Connection[Any] | None = None
        self._ready = False

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> PostgresDestination:
        """Build from the pipeline's destination table."""
        return cls(parse_options(PostgresConfig, options, "destination"))

    def connection(self) -> psycopg.Connection[Any]:
        """The destination's connection, (re)opened and set up on demand."""
        if self._conn is None or self._conn.closed or self._conn.broken:
            try:
                self._conn = psycopg.connect(
                    **{k: v for k, v in self._conninfo.items() if v is not None},
                    application_name="quarry-destination",
                    connect_timeout=10,
                )
            except psycopg.Error as exc:
                msg = f"cannot connect to {self.describe()['url']}: {first_line(exc)}"
                refused = "authentication failed" in str(exc) or "password" in str(exc)
                raise DestinationError(scrubber.text(msg), retryable=not refused) from None
            self._ready = False
        if not self._ready:
            self._setup(self._conn)
        return self._conn

    def _setup(self, conn: psycopg.Connection[Any]) -> None:
        schema = sql.Identifier(self.config.db_schema)
        try:
            with conn.transaction():
                conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(schema))
                conn.execute(
                    sql.SQL(
                        "CREATE TABLE IF NOT EXISTS {}._quarry_slices ("
                        " dest_table text NOT NULL, run_id text NOT NULL, slice integer NOT NULL,"
                        " epoch bigint NOT NULL, rows bigint,"
                        " written_at timestamptz NOT NULL DEFAULT now(),"
                        " PRIMARY KEY (dest_table, run_id, slice))"
                    ).format(schema)
                )
        except psycopg.errors.UniqueViolation:
            pass  # created concurrently by another worker: it exists now
        except psycopg.Error as exc:
            msg = f"cannot prepare schema {self.config.db_schema!r}: {first_line(exc)}"
            raise DestinationError(scrubber.text(msg)) from None
        self._ready = True

    def table_name(self, resource: str) -> str:
        """The table ``resource`` is written to."""
        return self.config.table.replace("{resource}", resource)

    def stage(self, key: SliceKey, log: Logger) -> StagedTable:
        """Open the slice's transaction and claim the slice under the lease epoch."""
        return StagedTable(self, key, log)

    def prepare_finish(self, scope: RunScope, log: Logger) -> Publish | None:
        """Append publishes every slice as it commits: nothing is left for the run's end."""
        return None

    def abort(self, scope: RunScope, log: Logger) -> None:
        """Append keeps a failed run's committed slices."""

    def describe(self) -> dict[str, Any]:
        """Kind, server (password hidden), schema and table template."""
        return {
            "type": "sql",
            "url": self.url.render_as_string(hide_password=True),
            "schema": self.config.db_schema,
            "table": self.config.table,
        }

    def close(self) -> None:
        """Close the connection."""
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                self._conn.close()
            self._conn = None


class StagedTable:
    """One slice's open transaction on its table."""

    def __init__(self, dest: PostgresDestination, key: SliceKey, log: Logger) -> None:
        self.dest = dest
        self.key = key
        self.log = log
        self.rows = 0
        self.table = dest.table_name(key.resource)
        self._schema = dest.config.db_schema
        self._ident = sql.Identifier(self._schema, self.table)
        self.conn = dest.connection()
        self._stream: contextlib.ExitStack | None = None
        self._stream_columns: list[str] | None = None
        self._stream_base = 0
        self._copy_stream: Any = None
        try:
            self._claim()
            self.columns = self._load_columns()
            if self.columns:
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
                f"{self.table} slice {self.key.index} of {self.key.run_id} was written "
                f"by a newer lease epoch than {self.key.epoch}"
            )
            raise LeaseLost(msg)

    def _load_columns(self) -> dict[str, str]:
        rows = self.conn.execute(
            "SELECT column_name, data_type FROM information_schema.columns"
            " WHERE table_schema = %s AND table_name = %s ORDER BY ordinal_position",
            (self._schema, self.table),
        ).fetchall()
        return {str(name): str(kind) for name, kind in rows}

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
        if isinstance(rows, RowPage) and self._stream_rows(rows, names):
            return
        self._end_stream()
        json = any(self.columns.get(n) == "jsonb" for n in names)
        fast = not json and (isinstance(rows, RowPage) or all(len(r) == len(names) for r in rows))
        try:
            self._evolve(rows, names)
            for attempt in range(len(names) + 2):
                try:
                    with self.conn.transaction():  # a savepoint: a refused page undoes only itself
                        self._copy(rows, names, fast=fast)
                    break
                except (psycopg.ProgrammingError, TypeError):
                    if not fast:
                        raise
                    fast = False  # an unadaptable value: the careful path names it
                except psycopg.errors.DataError as exc:
                    if attempt > len(names) or not self._widen_for(exc, rows):
                        raise DestinationError(self._locate(exc)) from None
        except psycopg.Error as exc:
            msg = f"{self.table}: {first_line(exc)}"
            raise DestinationError(scrubber.text(msg)) from None
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
                if any(self.columns.get(n) == "jsonb" for n in names):
                    return False
                statement = sql.SQL("COPY {} ({}) FROM STDIN").format(
                    self._ident,
                    sql.SQL(", ").join(
                        sql.Identifier(n) for n in ("_quarry_run_id", "_quarry_slice", *names)
                    ),
                )
                stack = contextlib.ExitStack()
                cursor = stack.enter_context(self.conn.cursor())
                self._copy_stream = stack.enter_context(cursor.copy(statement))
                self._stream, self._stream_columns, self._stream_base = stack, names, self.rows
            head = (self.key.run_id, self.key.index)
            write_row = self._copy_stream.write_row
            for values in rows.tuples:
                write_row(head + tuple(values))
        except psycopg.errors.DataError as exc:
            self._abandon_stream()
            raise DestinationError(self._locate(exc, self._stream_base)) from None
        except psycopg.Error as exc:
            self._abandon_stream()
            raise DestinationError(scrubber.text(f"{self.table}: {first_line(exc)}")) from None
        self.rows += len(rows)
        return True

    def _end_stream(self) -> None:
        """Finish an open COPY; the server's verdict on its rows arrives here."""
        stack, self._stream, self._stream_columns = self._stream, None, None
        if stack is None:
            return
        try:
            stack.close()
        except psycopg.errors.DataError as exc:
            raise DestinationError(self._locate(exc, self._stream_base)) from None
        except psycopg.Error as exc:
            raise DestinationError(scrubber.text(f"{self.table}: {first_line(exc)}")) from None

    def _abandon_stream(self) -> None:
        stack, self._stream, self._stream_columns = self._stream, None, None
        if stack is not None:
            with contextlib.suppress(Exception):
                stack.__exit__(DestinationError, DestinationError("slice discarded"), None)

    def _copy(self, rows: Page, names: list[str], *, fast: bool) -> None:
        json_columns = [i for i, n in enumerate(names) if self.columns.get(n) == "jsonb"]
        head = (self.key.run_id, self.key.index)
        statement = sql.SQL("COPY {} ({}) FROM STDIN").format(
            self._ident,
            sql.SQL(", ").join(
                sql.Identifier(n) for n in ("_quarry_run_id", "_quarry_slice", *names)
            ),
        )
        with self.conn.cursor() as cur, cur.copy(statement) as copy:
            if fast and isinstance(rows, RowPage):
                for values in rows.tuples:  # tuples from a SQL source: no dict at all
                    copy.write_row(head + tuple(values))
                return
            if fast:
                # Every row has every column and none is JSON: C-level tuples, no per-value work.
                take = operator.itemgetter(*names)
                if len(names) == 1:
                    for row in rows:
                        copy.write_row((*head, take(row)))
                else:
                    for row in rows:
                        copy.write_row(head + take(row))
                return
            for number, row in enumerate(rows, start=1):
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
        columns = sql.SQL(", ").join(
            sql.SQL("{} {}").format(sql.Identifier(n), sql.SQL(types[n])) for n in new
        )
        if not self.columns:
            with self.conn.transaction():
                self.conn.execute(
                    sql.SQL(
                        "CREATE TABLE IF NOT EXISTS {} (_quarry_run_id text NOT NULL,"
                        " _quarry_slice integer NOT NULL,"
                        " _quarry_loaded_at timestamptz NOT NULL DEFAULT now(), {})"
                    ).format(self._ident, columns)
                )
                self.conn.execute(
                    sql.SQL(
                        "CREATE INDEX IF NOT EXISTS {} ON {} (_quarry_run_id, _quarry_slice)"
                    ).format(sql.Identifier(f"{self.table}_quarry_slice_idx"[:63]), self._ident)
                )
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
                message=f"Schema changed at row {self.rows + 1} of {self.table}: "
                + ", ".join(f"new column {n!r} ({types[n]})" for n in new),
                table=self.table,
                row=self.rows + 1,
                added_columns=new,
            )

    def _existed_before(self, new: list[str]) -> bool:
        # A table that already had data columns: the new ones are drift, not creation.
        return any(c not in META_COLUMNS and c not in new for c in self.columns)

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
        self.conn.execute(
            sql.SQL("ALTER TABLE {} ALTER COLUMN {} TYPE {}").format(
                self._ident, sql.Identifier(column), sql.SQL(target)
            )
        )
        self.log.warning(
            Event.SCHEMA_CHANGED,
            message=(
                f"Schema changed at row {self.rows + row} of {self.table}: "
                f"{column!r} widened {self.columns[column]} -> {target}"
            ),
            table=self.table,
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
        if row is None:
            return f"{self.table}: {problem}"
        where = f"row {(self.rows if base is None else base) + row}" + (
            f", column {column!r}" if column else ""
        )
        return f"{where}: {problem}"

    # -- the slice's end ------------------------------------------------------

    def seal(self) -> SliceStats:
        """End the COPY, record the row count on the slice's claim; the transaction stays open."""
        self._end_stream()
        try:
            self.conn.execute(
                sql.SQL(
                    "UPDATE {}._quarry_slices SET rows = %s"
                    " WHERE dest_table = %s AND run_id = %s AND slice = %s"
                ).format(sql.Identifier(self._schema)),
                (self.rows, self.table, self.key.run_id, self.key.index),
            )
        except psycopg.Error as exc:
            raise DestinationError(f"{self.table}: {first_line(exc)}") from None
        return SliceStats(rows=self.rows, files=0, bytes=0)

    def publish(self) -> None:
        """Commit: the slice's rows replace its earlier attempt's, all at once."""
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
