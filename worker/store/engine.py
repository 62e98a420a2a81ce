"""Engines for the store: SQLite tuned for many processes, PostgreSQL as it comes."""

from __future__ import annotations

import functools
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import ExceptionContext, make_url
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.expression import FunctionElement
from sqlalchemy.types import Float

from worker.errors import StoreUnavailable
from worker.jsonfmt import dumps, loads
from worker.scrub import describe

#: How long a SQLite writer waits for the file lock before giving up.
SQLITE_BUSY_TIMEOUT_MS = 30_000

#: PostgreSQL ends a session that sits inside a transaction this long. Quarry's
#: transactions are milliseconds; a frozen worker (SIGSTOP, a VM pause) caught
#: mid-transaction would otherwise hold its run's row and entry locks, and hold back
#: the flat view's horizon, until it wakes. Keep it well under the lease TTL.
PG_IDLE_IN_TRANSACTION_MS = 5_000
#: And a statement (a COPY whose client froze half-way) at most this long.
PG_STATEMENT_TIMEOUT_MS = 30_000


def aware(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; everything Quarry stores is UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


#: Connections a SQLite engine opens beyond its five pooled ones (they are file handles).
SQLITE_MAX_OVERFLOW = 45


def make_engine(url: str, *, immediate: bool = True) -> Engine:
    """An engine for ``url``; on SQLite, transactions take the write lock at BEGIN.

    ``BEGIN IMMEDIATE`` serialises writers up front: a deferred transaction that
    reads and then writes would fail with SQLITE_BUSY instead of waiting, and
    fenced writes read the lease before they write.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        options = (
            f"-c idle_in_transaction_session_timeout={PG_IDLE_IN_TRANSACTION_MS} "
            f"-c statement_timeout={PG_STATEMENT_TIMEOUT_MS}"
        )
        engine = create_engine(
            url,
            connect_args={"options": options},
            pool_pre_ping=True,
            json_serializer=dumps,
            json_deserializer=loads,
            pool_size=5,
            max_overflow=10,
        )
        event.listen(engine, "handle_error", _store_unavailable)
        return engine
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        url,
        json_serializer=dumps,
        json_deserializer=loads,
        connect_args={"timeout": 30},
        # Room for every thread of the API's pool (40) and its event loop, which checks
        # tokens itself on SQLite: it must never wait for a connection a thread holds.
        pool_size=5,
        max_overflow=SQLITE_MAX_OVERFLOW,
    )

    event.listen(engine, "handle_error", _store_unavailable)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Hand transaction control to SQLAlchemy's "begin" event below.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


def driver_cursor(conn: Connection) -> Any:
    """A DBAPI cursor on ``conn``, for reads that skip SQLAlchemy's result layer.

    The hot reads (entry pages, token checks) go to the driver directly:
    SQLAlchemy's per-statement and per-row processing cost more than the query
    itself. On PostgreSQL ``begin()`` keeps SQLAlchemy's bookkeeping in step
    with psycopg's implicit transaction. On SQLite nothing is begun: each
    statement reads its own snapshot, which is all these reads need, and a
    BEGIN through SQLAlchemy cost more than the token check's whole query. The
    pool rolls the connection back when it returns either way.
    """
    if conn.dialect.name != "sqlite" and not conn.in_transaction():
        conn.begin()
    return _Cursor(conn.connection.driver_connection.cursor())  # type: ignore[union-attr]


class _Cursor:
    """A driver cursor whose outage errors are :class:`StoreUnavailable`, as SQLAlchemy's are."""

    __slots__ = ("_cursor",)

    def __init__(self, cursor: Any) -> None:
        self._cursor = cursor

    def execute(self, sql: str, params: Any = ()) -> None:
        try:
            self._cursor.execute(sql, params)
        except _driver_outages() as exc:
            raise StoreUnavailable(describe(exc)) from exc

    def fetchone(self) -> Any:
        return self._cursor.fetchone()

    def fetchall(self) -> list[Any]:
        return self._cursor.fetchall()  # type: ignore[no-any-return]

    def close(self) -> None:
        self._cursor.close()


def fetch_one(conn: Connection, sql: str, params: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """The first row of ``sql`` through :func:`driver_cursor`, or None."""
    cursor = driver_cursor(conn)
    try:
        cursor.execute(sql, params)
        return cursor.fetchone()  # type: ignore[no-any-return]
    finally:
        cursor.close()


class db_epoch(FunctionElement[float]):  # noqa: N801 - reads as the SQL function it compiles to
    """The database clock as float seconds since the Unix epoch."""

    type = Float()
    inherit_cache = True


@compiles(db_epoch, "postgresql")
def _db_epoch_pg(_element: Any, _compiler: Any, **_kw: Any) -> str:
    return "CAST(EXTRACT(EPOCH FROM clock_timestamp()) AS DOUBLE PRECISION)"


@compiles(db_epoch, "sqlite")
def _db_epoch_sqlite(_element: Any, _compiler: Any, **_kw: Any) -> str:
    return "((julianday('now') - 2440587.5) * 86400.0)"


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


@functools.cache
def _driver_outages() -> tuple[type[Exception], ...]:
    """The drivers' own errors for a database that cannot be reached or used right now."""
    import sqlite3  # noqa: PLC0415 - asked for once; psycopg is not loaded at import

    import psycopg  # noqa: PLC0415

    return (psycopg.OperationalError, psycopg.InterfaceError, sqlite3.OperationalError)


def unavailable_errors() -> tuple[type[Exception], ...]:
    """Every exception that says the store is unreachable or unusable right now, not a bug.

    Statement and connection errors arrive as :class:`StoreUnavailable` (see
    ``_store_unavailable`` and ``_Cursor``); a pool that timed out waiting for a
    connection is SQLAlchemy's own.
    """
    return (StoreUnavailable, sa_exc.TimeoutError)


def _store_unavailable(context: ExceptionContext) -> None:
    """``handle_error``: operational and interface errors (a restart, a failover, a refused
    connection, a locked file) become :class:`StoreUnavailable`, a Quarry error callers
    catch without knowing the driver.

    Not during the pool's pre-ping: a pooled connection that a database restart ended
    must be found dead there and replaced, which SQLAlchemy does only with its own error.
    """
    if context.is_pre_ping:
        return
    if context.is_disconnect or isinstance(
        context.sqlalchemy_exception, sa_exc.OperationalError | sa_exc.InterfaceError
    ):
        raise StoreUnavailable(describe(context.original_exception)) from (
            context.sqlalchemy_exception or context.original_exception
        )
