"""The SQL source: tables or named queries from any database SQLAlchemy reaches.

Each resource is a table (``table``, optional ``schema``) or a query
(``query``). A sliced resource filters ``slice_column`` to each window
(``start <= column < end``; a timestamp column for time slices, an integer one
for id slices). An incremental resource (``cursor_column``) reads only rows
above the high-water mark of the last successful run. A query may place the
filters itself with ``:window_start`` / ``:window_end`` and ``:since`` where
the planner cannot push an outer filter in (aggregates, volatile functions). Rows stream through a
server-side cursor (PostgreSQL named cursors, MySQL ``SSCursor``) in pages of
``page_size``, so memory stays flat however large the table is.
"""

from __future__ import annotations

import contextlib
import re
import uuid
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import psycopg
import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, Field, model_validator
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, NoSuchTableError, SQLAlchemyError

from worker.dbfaults import is_transient
from worker.errors import ConfigError, SourceError
from worker.pipelines import ResourceConfig, Window, parse_options
from worker.scrub import scrubber
from worker.sources.base import Page, ReadContext, RowPage


class SqlConfig(BaseModel):
    """The ``[source]`` table of a SQL pipeline."""

    model_config = ConfigDict(extra="forbid")

    url: str
    #: Rows per page: one page is one fetch from the server-side cursor.
    page_size: int = Field(default=10_000, ge=1, le=1_000_000)


class SqlResource(BaseModel):
    """A resource's ``options``: what to read and how to slice it."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    table: str | None = None
    db_schema: str | None = Field(default=None, alias="schema")
    query: str | None = None
    columns: list[str] | None = None
    slice_column: str | None = None
    cursor_column: str | None = None
    order_by: list[str] | None = None

    @model_validator(mode="after")
    def _one_target(self) -> SqlResource:
        if (self.table is None) == (self.query is None):
            msg = "give exactly one of table or query"
            raise ValueError(msg)
        return self


class SqlSource:
    """Reads tables and queries through one SQLAlchemy engine."""

    def __init__(self, config: SqlConfig) -> None:
        self.config = config
        try:
            url = make_url(config.url)
        except ArgumentError:
            msg = "source.url: not a SQLAlchemy database URL"
            raise ConfigError(msg) from None
        scrubber.register([url.password if isinstance(url.password, str) else None])
        try:
            # hide_parameters: a failed statement's error never carries row values.
            self.engine: Engine = sa.create_engine(
                url, pool_size=1, max_overflow=1, pool_pre_ping=True, hide_parameters=True
            )
        except (NoSuchModuleError, ImportError) as exc:
            msg = f"source.url: no driver for {url.drivername!r} ({exc})"
            raise ConfigError(msg) from None
        self._selectables: dict[str, tuple[sa.FromClause, SqlResource]] = {}

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> SqlSource:
        """Build from the pipeline's source table merged with run params."""
        return cls(parse_options(SqlConfig, options, "source"))

    # -- planning -------------------------------------------------------------

    def _target(self, resource: ResourceConfig) -> tuple[sa.FromClause, SqlResource]:
        cached = self._selectables.get(resource.name)
        if cached is not None:
            return cached
        where = f"resources.{resource.name}.options"
        spec = parse_options(SqlResource, resource.options, where)
        own = placeholders(spec.query or "")
        if resource.slices is not None and spec.slice_column is None and "window_start" not in own:
            msg = f"{where}.slice_column: a sliced resource needs the column its windows filter"
            raise ConfigError(msg)
        try:
            if spec.table is not None:
                target: sa.FromClause = sa.Table(
                    spec.table, sa.MetaData(), schema=spec.db_schema, autoload_with=self.engine
                )
            else:
                target = self._query(str(spec.query))
        except NoSuchTableError:
            msg = f"{where}.table: no table {spec.table!r} in the source database"
            raise SourceError(msg) from None
        except SQLAlchemyError as exc:
            raise SourceError(f"{where}: {_describe(exc)}", retryable=is_transient(exc)) from None
        wanted = [
            *(spec.columns or []),
            *(c for c in (spec.slice_column, spec.cursor_column) if c),
            *(spec.order_by or []),
        ]
        if spec.columns and spec.cursor_column and spec.cursor_column not in spec.columns:
            msg = f"{where}.columns: must include the cursor_column {spec.cursor_column!r}"
            raise ConfigError(msg)
        missing = [c for c in wanted if c not in target.c]
        if missing:
            known = ", ".join(target.c.keys())
            msg = f"{where}: no column {', '.join(map(repr, missing))} (columns: {known})"
            raise ConfigError(msg)
        self._selectables[resource.name] = (target, spec)
        return target, spec

    def _query(self, query: str) -> sa.FromClause:
        # The query's columns, without running it: an empty result carries the names.
        probe = sa.text(f"SELECT * FROM ({query}) AS quarry_q WHERE 1 = 0")  # noqa: S608 - the pipeline author's own query
        nulls = {name: None for name in placeholders(query)}
        with self.engine.connect() as conn:
            names = list(conn.execute(probe, nulls).keys())
        return sa.text(query).columns(*(sa.column(n) for n in names)).subquery("quarry_q")

    def statement(
        self, resource: ResourceConfig, window: Window | None, since: Any
    ) -> sa.Select[Any]:
        """The SELECT one slice reads (exposed for tests and the docs)."""
        target, spec = self._target(resource)
        own = placeholders(spec.query or "")
        columns = [target.c[c] for c in spec.columns] if spec.columns else list(target.c)
        stmt = sa.select(*columns)
        if window is not None and spec.slice_column and "window_start" not in own:
            col = target.c[spec.slice_column]
            stmt = stmt.where(col >= window.start, col < window.end)
        if since is not None and spec.cursor_column and "since" not in own:
            stmt = stmt.where(target.c[spec.cursor_column] > since)
        if spec.order_by:
            stmt = stmt.order_by(*(target.c[c] for c in spec.order_by))
        return stmt

    # -- reading --------------------------------------------------------------

    def read(
        self, resource: ResourceConfig, window: Window | None, context: ReadContext
    ) -> Iterator[Page]:
        """Stream the slice's rows in pages through a server-side cursor."""
        _, spec = self._target(resource)
        stmt = self.statement(resource, window, context.since)
        values = {
            "window_start": window.start if window else None,
            "window_end": window.end if window else None,
            "since": context.since,
        }
        bound = {k: v for k, v in values.items() if k in placeholders(spec.query or "")}
        cursor_column = spec.cursor_column
        try:
            pages = (
                self._psycopg_pages(stmt, bound)
                if self.engine.dialect.driver == "psycopg"
                else self._pages(stmt, bound)
            )
            mark: int | None = None
            for page in pages:
                if cursor_column is not None:
                    mark = page.columns.index(cursor_column) if mark is None else mark
                    marks = [row[mark] for row in page.tuples if row[mark] is not None]
                    if marks:
                        context.observe(max(marks))
                yield page
        except (SQLAlchemyError, psycopg.Error) as exc:
            raise SourceError(
                f"{resource.name}: {_describe(exc)}", retryable=is_transient(exc)
            ) from None

    def _pages(self, stmt: sa.Select[Any], bound: dict[str, Any]) -> Iterator[RowPage]:
        """Any database: SQLAlchemy's streaming result (server-side where the driver has it)."""
        size = self.config.page_size
        with self.engine.connect() as conn:
            finished = False
            try:
                result = conn.execution_options(yield_per=size).execute(stmt, bound)
                keys = list(result.keys())
                for part in result.partitions(size):
                    yield RowPage(keys, part)
                finished = True
            finally:
                if not finished and conn.dialect.name in {"mysql", "mariadb"}:
                    self._kill_query(conn)
                    with contextlib.suppress(SQLAlchemyError), warnings.catch_warnings():
                        # Reads up to the kill ("interrupted"); the connection is usable again.
                        warnings.filterwarnings("ignore", "Previous unbuffered result")
                        conn.rollback()

    def _kill_query(self, conn: sa.Connection) -> None:
        """Stop a MySQL query abandoned mid-slice (SIGTERM, cancel).

        A MySQL driver must read an unbuffered result to its end before the
        connection is usable or closed, which on a large table means every
        remaining row; after ``KILL QUERY`` from another connection the server
        stops sending, so the drain is short.
        """
        thread_id = getattr(conn.connection.driver_connection, "thread_id", None)
        if thread_id is None:
            return
        with contextlib.suppress(SQLAlchemyError), self.engine.connect() as killer:
            killer.exec_driver_sql(f"KILL QUERY {int(thread_id())}")

    def _psycopg_pages(self, stmt: sa.Select[Any], bound: dict[str, Any]) -> Iterator[RowPage]:
        """PostgreSQL: a psycopg named cursor, rows as plain tuples.

        The statement is still built and compiled by SQLAlchemy; only the rows skip
        SQLAlchemy's result layer, which cost about a fifth of a table copy.
        """
        compiled = stmt.compile(dialect=self.engine.dialect)
        params = {**compiled.params, **bound}
        size = self.config.page_size
        with self.engine.connect() as conn:
            driver = conn.connection.driver_connection
            assert isinstance(driver, psycopg.Connection)
            with driver.cursor(name=f"quarry_{uuid.uuid4().hex[:12]}") as cursor:
                cursor.itersize = size
                cursor.execute(str(compiled), params)
                keys = [column.name for column in cursor.description or ()]
                while rows := cursor.fetchmany(size):
                    yield RowPage(keys, rows)
            conn.rollback()

    def close(self) -> None:
        """Close the engine's connections."""
        self.engine.dispose()


_PLACEHOLDER = re.compile(r"(?<![:\w]):(window_start|window_end|since)\b")


def placeholders(query: str) -> set[str]:
    """Which of ``:window_start``, ``:window_end`` and ``:since`` a query binds itself."""
    return set(_PLACEHOLDER.findall(query))


#: Words of a refused login: the database is up and said no, so a retry cannot help.
def _describe(exc: Exception) -> str:
    """The driver's own message, first line only: no SQL text, no parameters."""
    original = getattr(exc, "orig", None)
    text = str(original if original is not None else exc).strip().splitlines()
    return scrubber.text(f"{type(original or exc).__name__}: {text[0] if text else ''}")
