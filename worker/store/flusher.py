"""The log writer's flushes on a PostgreSQL connection of their own.

A worker process's log writer flushes a few times a second, nearly always a
small batch of one lease (one run per pool process). Such a batch is one
statement (:func:`~worker.store.entries.fenced_insert_sql`). Sent through the
store's engine it would also pay for the pool's checkout with its pre-ping, a
``BEGIN`` and a ``COMMIT`` (round trips all) and SQLAlchemy's transaction and
statement bookkeeping: with 64 writers on two cores a plain ``INSERT`` sent that
way ran at under half the transactions/s of the bare statement
(``docs/benchmarks.md``). So the flusher keeps one
connection of the engine's pool checked out between flushes, in autocommit, and
sends the statement on it directly: one round trip a flush.

Everything else (several leases, unfenced entries, a batch past
:data:`~worker.store.entries.SMALL_BATCH`, a flush that reaches the run's entry
cap) goes through :meth:`Store.append_entries`, the same statement or its longer
path in an ordinary transaction. The ordering argument is the statement's, not
the connection's: the fence, the run's entry lock and the writer's position lock
are taken in it exactly as there.

A connection that fails is dropped and the error raised (``StoreUnavailable``
for a lost connection or server), and the writer keeps the batch for its next
try, as for any failed flush. Before each flush the kept connection's socket is
polled (no round trip): one the server ended while it sat idle (a restart) is
replaced by a fresh one from the pool, whose checkout pings it, before anything
is sent.
"""

from __future__ import annotations

import select
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import psycopg
from sqlalchemy import exc as sa_exc

from worker.errors import StoreUnavailable
from worker.models import NewEntry
from worker.scrub import describe
from worker.store.entries import fenced_insert_sql, fenced_params, single_lease

if TYPE_CHECKING:
    from worker.store.store import Store

#: Driver errors that mean the connection or the server failed, not the statement.
_CONNECTION_ERRORS = (psycopg.OperationalError, psycopg.InterfaceError)


def _sound(conn: psycopg.Connection[Any]) -> bool:
    """Whether an idle connection still looks alive, without a round trip: a server that
    ended it (a restart, ``pg_terminate_backend``) has sent its goodbye or closed the
    socket, so the socket reads as ready, which an idle session's never does."""
    if conn.closed or conn.broken:
        return False
    try:
        ready, _, _ = select.select([conn.fileno()], [], [], 0)
    except (OSError, ValueError):
        return False
    return not ready


class EntryFlusher:
    """``append_entries`` for one log writer, with its small batches on a kept connection.

    Call it as the writer's ``append``; one flush at a time (the writer's ``io_lock``
    already serialises them, the flusher's own lock makes sure). Closed by
    :meth:`Store.close`.
    """

    def __init__(self, store: Store) -> None:
        self._store = store
        self._lock = threading.Lock()
        self._pooled: Any = None  # the pool's connection, checked out while kept
        self._closed = False

    def __call__(self, entries: Sequence[NewEntry]) -> set[tuple[str, int]]:
        """Store ``entries``; returns the ``(run_id, epoch)`` pairs refused (lease gone)."""
        lease = single_lease(entries) if self._store.dialect == "postgresql" else None
        if lease is None:
            return self._store.append_entries(entries)
        with self._lock:
            stored = not self._closed and self._send(*lease, entries)
        if not stored:  # closed, the lease gone or the cap reached: the ordinary path tells
            return self._store.append_entries(entries)
        self._store.notify_entries({lease[0]})
        return set()

    def _send(self, run_id: str, epoch: int, entries: Sequence[NewEntry]) -> bool:
        """The fenced statement as a transaction of its own: whether it stored the batch."""
        _, params = fenced_params(
            run_id, epoch, entries, self._store.max_entries_per_run, whole=True
        )
        sql = fenced_insert_sql(len(entries), whole=True)
        try:
            found = self._execute(self._connection(), sql, params)
        except _CONNECTION_ERRORS as exc:
            self._drop()
            raise StoreUnavailable(describe(exc)) from exc
        except BaseException:
            self._drop()
            raise
        return found is not None

    @staticmethod
    def _execute(conn: Any, sql: str, params: tuple[Any, ...]) -> tuple[Any, ...] | None:
        with conn.cursor() as cursor:
            cursor.execute(sql, params)
            return cursor.fetchone()  # type: ignore[no-any-return]

    def _connection(self) -> psycopg.Connection[Any]:
        if self._pooled is not None and not _sound(self._pooled.driver_connection):
            self._drop()  # ended while it sat idle (a restart): nothing was sent on it
        if self._pooled is None:
            try:
                pooled = self._store.engine.raw_connection()
            except StoreUnavailable:
                raise
            except (sa_exc.DBAPIError, sa_exc.TimeoutError) as exc:
                raise StoreUnavailable(describe(exc)) from exc
            driver = pooled.driver_connection
            assert isinstance(driver, psycopg.Connection)
            driver.autocommit = True
            self._pooled = pooled
        return self._pooled.driver_connection  # type: ignore[no-any-return]

    def _drop(self) -> None:
        """Give the kept connection up as broken (the pool opens another when asked)."""
        pooled, self._pooled = self._pooled, None
        if pooled is not None:
            pooled.invalidate()

    def close(self) -> None:
        """Return the kept connection to the pool; later flushes take the ordinary path."""
        with self._lock:
            self._closed = True
            pooled, self._pooled = self._pooled, None
        if pooled is not None:
            try:
                pooled.driver_connection.autocommit = False  # as the pool lent it
            except psycopg.Error:
                pooled.invalidate()
                return
            pooled.close()
