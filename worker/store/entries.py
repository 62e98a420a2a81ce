"""The entry write path: buffered batches and state-change entries into ``log_entries``.

Mixed into :class:`~worker.store.store.Store`. Inserts go through the driver
(SQLAlchemy's per-row bind processing cost more than the insert itself); on
PostgreSQL every entry-writing transaction takes, before its insert, the entry
lock of each run it writes for (so a run's id order is its commit order) and
registers its position for the cross-run horizon (:data:`HORIZON_SQL`); the per-run
cap on info entries is counted on the run row in the inserting transaction.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import sqlite3
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NamedTuple, cast

from sqlalchemy import Connection, update

from worker.jsonfmt import dumps, loads
from worker.models import TERMINAL_EVENTS, Event, Level, NewEntry
from worker.store import metrics
from worker.store.engine import fetch_one, utcnow
from worker.store.tables import runs

#: First key of a run's entry lock (two-key advisory lock, the second key from
#: :func:`run_lock_key`): one run's entry writers take turns, unrelated runs do not.
RUN_ENTRY_LOCK = 0x5145_4E54  # "QENT"
#: A writer's position lock is the one-key advisory lock ``POSITION_BASE + position``
#: (shared): keys in this band are read back as positions by :data:`HORIZON_SQL`.
POSITION_BASE = 0x51 << 56
_POSITION_CLASS = POSITION_BASE >> 32  # pg_locks.classid of position 0
#: The sequence behind ``log_entries.id`` (its identity column's).
ENTRY_ID_SEQUENCE = "log_entries_id_seq"
#: Where a writer stands: ids it takes from now on are above the sequence's last value.
POSITION_SQL = f"{POSITION_BASE} + (SELECT last_value FROM {ENTRY_ID_SEQUENCE})"  # noqa: S608

_ENTRY_COLUMNS = (
    "run_id",
    "level",
    "event",
    "message",
    "data",
    "worker_id",
    "attempt",
    "occurred_at",
)

#: Key in ``Connection.info`` where a transaction collects the runs it wrote entries for.
_TOUCHED = "quarry.touched_runs"
#: Key in ``Connection.info``: the transaction's :class:`EntryLocks` (PostgreSQL).
_LOCKS = "quarry.entry_locks"

_LOCK_RUNS = (
    f"SELECT count(pg_advisory_xact_lock({RUN_ENTRY_LOCK}, k)) FROM unnest(%s::int4[]) AS k"  # noqa: S608
)
_LOCK_RUNS_AND_REGISTER = (
    f"SELECT pg_advisory_xact_lock_shared({POSITION_SQL}) "  # noqa: S608 - constants
    f"FROM ({_LOCK_RUNS}) AS locked"
)
#: The horizon of the cross-run view: the last id handed out (read first), plus one,
#: lowered to the oldest open writer's position (read after it, from the lock table).
HORIZON_SQL = f"""
SELECT least(
    s.last_value + CASE WHEN s.is_called THEN 1 ELSE 0 END,
    (SELECT min(((l.classid::int8 - {_POSITION_CLASS}) << 32) + l.objid::int8)
       FROM pg_locks AS l
      WHERE l.locktype = 'advisory' AND l.objsubid = 1
        AND l.classid::int8 >= {_POSITION_CLASS} AND l.classid::int8 < {_POSITION_CLASS + (1 << 24)}
        AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
        AND s.last_value IS NOT NULL))
FROM {ENTRY_ID_SEQUENCE} AS s
"""  # noqa: S608 - constants


@functools.lru_cache(maxsize=128)
def fenced_insert_sql(count: int, *, whole: bool = False) -> str:
    """A buffered flush of ``count`` entries of one lease as one statement (PostgreSQL).

    The fence's UPDATE raises the cap counter and, in its RETURNING, takes the run's
    entry lock and registers the writer; the INSERT's rows are gated on the fenced row
    (an InitPlan, read before any row asks the sequence for an id) and on the cap. It
    returns the fenced row and how many entries went in, or no row when the lease is
    gone. Parameters: :func:`fenced_params`.

    ``whole``: the statement is a transaction of its own (autocommit), so it must store
    all or nothing: the fence matches only while the cap has room for every cappable
    entry, and no row comes back either when the lease is gone or when the cap is
    reached (the caller then takes the ordinary path, which tells them apart).
    """
    row = (
        "(%s::varchar, %s::varchar, %s::varchar, %s::text, %s::jsonb, %s::varchar, %s::int, "
        "%s::timestamptz)"
    )
    columns = ", ".join(_ENTRY_COLUMNS)
    room = " AND entry_count + %s <= %s" if whole else ""
    gate = "" if whole else " WHERE fence.entry_count <= %s"
    return (
        "WITH fence AS ("  # noqa: S608 - constants and placeholders
        f"UPDATE runs SET entry_count = entry_count + %s WHERE id = %s AND lease_epoch = %s{room} "
        "RETURNING entry_count, entries_dropped, pipeline, "
        f"pg_advisory_xact_lock({RUN_ENTRY_LOCK}, %s) AS run_lock, "
        f"pg_advisory_xact_lock_shared({POSITION_SQL}) AS position_lock), "
        f"inserted AS (INSERT INTO log_entries ({columns}) "
        f"SELECT * FROM (VALUES {', '.join([row] * count)}) AS v ({columns}) "
        f"WHERE EXISTS (SELECT 1 FROM fence{gate}) RETURNING 1) "
        "SELECT entry_count, entries_dropped, pipeline, (SELECT count(*) FROM inserted) FROM fence"
    )


def fenced_params(
    run_id: str, epoch: int, entries: Sequence[NewEntry], cap: int | None, *, whole: bool = False
) -> tuple[int, tuple[Any, ...]]:
    """How many of ``entries`` the cap counts, and :func:`fenced_insert_sql`'s parameters."""
    cappable = sum(1 for e in entries if _cappable(e)) if cap is not None else 0
    bound = cap if cappable else 2**62
    params: list[Any] = [cappable, run_id, epoch]
    if whole:
        params += (cappable, bound)
    params.append(run_lock_key(run_id))
    for e in entries:
        params += _entry_row(e, e.occurred_at)
    if not whole:
        params.append(bound)
    return cappable, tuple(params)


def single_lease(entries: Sequence[NewEntry]) -> tuple[str, int] | None:
    """The one ``(run_id, epoch)`` of a batch that one fenced statement can store, or None:
    every entry fenced, all by the same lease, at most :data:`SMALL_BATCH` of them."""
    if not entries or len(entries) > SMALL_BATCH:
        return None
    first = entries[0]
    if first.epoch is None:
        return None
    for e in entries:
        if e.epoch != first.epoch or e.run_id != first.run_id:
            return None
    return first.run_id, first.epoch


class _Fenced(NamedTuple):
    """The fenced run row, as :meth:`EntryWrites._apply_cap` reads a counted one."""

    entry_count: int
    entries_dropped: int
    pipeline: str


#: Up to this many entries go in one INSERT; more go through COPY.
SMALL_BATCH = 50

#: The most rows one SQLite INSERT carries: 8 parameters a row makes 16,384, within
#: SQLite's default limit since 3.32 (fewer rows where a connection's limit is lower).
#: One statement of many rows is stepped once, where ``executemany`` steps once a row,
#: and each step lets go of the GIL and must take it back, while this writer holds the
#: file's write lock: behind a busy thread of the same process that wait is up to the
#: interpreter's switch interval (``sys.getswitchinterval()``) each time.
SQLITE_ROWS_PER_INSERT = 2048


def _sqlite_rows_per_insert(driver: sqlite3.Connection) -> int:
    """:data:`SQLITE_ROWS_PER_INSERT`, or the largest power of two below it whose parameters
    fit ``driver``'s limit (999 where SQLite is older than 3.32 or built so)."""
    limit = driver.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
    rows = SQLITE_ROWS_PER_INSERT
    while rows > 1 and rows * len(_ENTRY_COLUMNS) > limit:
        rows //= 2
    return rows


def _sqlite_chunks(count: int, most: int = SQLITE_ROWS_PER_INSERT) -> Iterator[tuple[int, int]]:
    """``(start, size)`` of the INSERTs for ``count`` rows, at most ``most`` (a power of two)
    a statement: sizes are powers of two, so a few prepared statements (in the driver's
    statement cache) serve every batch."""
    start = 0
    size = most
    while start < count:
        while size > count - start:
            size //= 2
        yield start, size
        start += size


@functools.lru_cache(maxsize=16)
def _sqlite_insert_sql(count: int) -> str:
    """An INSERT of ``count`` entry rows (SQLite)."""
    row = f"({', '.join('?' * len(_ENTRY_COLUMNS))})"
    return (
        f"INSERT INTO log_entries ({', '.join(_ENTRY_COLUMNS)}) "  # noqa: S608 - constants
        f"VALUES {', '.join([row] * count)}"
    )


_LEVEL_TEXT = {level: level.value for level in Level}


def _utc_text(value: datetime) -> str:
    """A timestamp as SQLAlchemy's SQLite DateTime stores it: naive UTC, microseconds.

    The date and time of day come from a small cache by second (a flush's entries share
    a few seconds): ``isoformat`` on every entry was a fifth of making its row.
    """
    if value.tzinfo is not UTC:
        value = value.astimezone(UTC)
    second = (value.year, value.month, value.day, value.hour, value.minute, value.second)
    text = _SECOND_TEXT.get(second)
    if text is None:
        if len(_SECOND_TEXT) >= 64:
            _SECOND_TEXT.clear()
        y, mo, d, h, mi, sec = second
        text = _SECOND_TEXT[second] = f"{y:04d}-{mo:02d}-{d:02d} {h:02d}:{mi:02d}:{sec:02d}"
    return f"{text}.{value.microsecond:06d}"


#: ``_utc_text``'s cache: second → its text (cleared when full; dict operations are atomic).
_SECOND_TEXT: dict[tuple[int, ...], str] = {}


def _entry_row(e: NewEntry, occurred_at: Any) -> tuple[Any, ...]:
    """An entry's values in ``_ENTRY_COLUMNS`` order, ``occurred_at`` as the driver takes it."""
    return _without_nul(
        (e.run_id, _LEVEL_TEXT[e.level], e.event, e.message, dumps(e.data),
         e.worker_id, e.attempt, occurred_at)
    )  # fmt: skip


def _sqlite_row(e: NewEntry) -> tuple[Any, ...]:
    """An entry's values as the SQLite INSERT takes them."""
    return _entry_row(e, _utc_text(e.occurred_at))


def _without_nul(row: tuple[Any, ...]) -> tuple[Any, ...]:
    """PostgreSQL text and jsonb cannot hold NUL: store it escaped, visibly, as ``\\x00``."""
    event, message, data = row[2], row[3], row[4]
    if "\x00" not in message and "\x00" not in event and "\\u0000" not in data:
        return row
    data = dumps(_strip_nul(loads(data)))
    return (*row[:2], _strip_nul(event), _strip_nul(message), data, *row[5:])


def _strip_nul(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace("\x00", "\\x00")
    if isinstance(value, dict):
        return {_strip_nul(k): _strip_nul(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_strip_nul(v) for v in value]
    return value


#: Info entries the cap never drops: ownership and endings, which readers wait for.
_UNCAPPED_EVENTS = frozenset({Event.LEASE_ACQUIRED.value, *(e.value for e in TERMINAL_EVENTS)})


def _cappable(entry: NewEntry) -> bool:
    """Whether the per-run cap may drop this entry: info or debug, and not a lifecycle end."""
    return entry.level.rank < Level.WARNING.rank and entry.event not in _UNCAPPED_EVENTS


def _truncation_entry(run_id: str, cap: int, dropped: int, *, final: bool) -> NewEntry:
    """The ``log_truncated`` entry: when the cap is first reached, and the total at the end."""
    message = (
        f"Log truncated: {dropped:,} info entries past the cap of {cap:,} were dropped in all"
        if final
        else f"Log reached its cap of {cap:,} info entries: later ones are dropped; "
        "warnings and errors are always kept"
    )
    return NewEntry(
        run_id=run_id,
        level=Level.WARNING,
        event=Event.LOG_TRUNCATED.value,
        message=message,
        occurred_at=utcnow(),
        data={"limit": cap, "dropped": dropped, "final": final},
    )


def run_lock_key(run_id: str) -> int:
    """The second key of ``run_id``'s entry lock: a stable 32-bit hash (a collision only
    makes two runs take turns)."""
    digest = hashlib.blake2b(run_id.encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big", signed=True)


class EntryLocks:
    """What one PostgreSQL transaction holds of the entry write path (``Connection.info``)."""

    __slots__ = ("registered", "runs")

    def __init__(self) -> None:
        #: Second keys of the run entry locks held.
        self.runs: set[int] = set()
        #: Whether the writer's position lock is held.
        self.registered = False

    def took(self, run_key: int) -> None:
        """A statement took this run's entry lock and registered the writer."""
        self.runs.add(run_key)
        self.registered = True

    @staticmethod
    def of(conn: Connection) -> EntryLocks:
        """The locks of ``conn``'s transaction (cleared by ``Store._transaction``)."""
        locks = conn.info.get(_LOCKS)
        if locks is None:
            locks = conn.info[_LOCKS] = EntryLocks()
        return locks


def holds(conn: Connection, run_id: str, epoch: int) -> bool:
    """Whether lease ``epoch`` still holds ``run_id``, checked by a no-op UPDATE of the run
    row: its lock keeps a takeover from committing before this transaction does (the fence
    of a write that has no state change of its own: entries, telemetry samples)."""
    touched = conn.execute(
        update(runs)
        .where(runs.c.id == run_id, runs.c.lease_epoch == epoch)
        .values(lease_epoch=runs.c.lease_epoch)
    ).rowcount
    return bool(touched == 1)


class EntryWrites:
    """Entry inserts, the cap and the entry locks (mixed into ``Store``)."""

    dialect: str
    max_entries_per_run: int | None

    if TYPE_CHECKING:

        def _transaction(self) -> contextlib.AbstractContextManager[Connection]: ...

    def append_entries(self, entries: Sequence[NewEntry]) -> set[tuple[str, int]]:
        """Store buffered entries; fenced groups whose lease is gone are dropped.

        Returns the ``(run_id, epoch)`` pairs that were refused, so the writer
        can tell their runs that the lease is lost.
        """
        if not entries:
            return set()
        lease = single_lease(entries) if self.dialect == "postgresql" else None
        if lease is not None:
            with self._transaction() as conn:
                if self._fenced_flush(conn, *lease, entries):
                    return set()
            return {lease}
        fenced: dict[tuple[str, int], None] = {}
        for entry in entries:
            if entry.epoch is not None:
                fenced[(entry.run_id, entry.epoch)] = None
        refused: set[tuple[str, int]] = set()
        # SQLite: the rows are made before BEGIN IMMEDIATE takes the file's write lock,
        # which every other writer of every process waits for.
        rows = {id(e): _sqlite_row(e) for e in entries} if self.dialect == "sqlite" else None
        with self._transaction() as conn:
            for run_id, epoch in fenced:
                if not holds(conn, run_id, epoch):
                    refused.add((run_id, epoch))
            kept = [e for e in entries if e.epoch is None or (e.run_id, e.epoch) not in refused]
            self._insert_entries(conn, kept, made=rows)
        return refused

    def _fenced_flush(
        self, conn: Connection, run_id: str, epoch: int, entries: Sequence[NewEntry]
    ) -> bool:
        """One lease's flush in one statement (:func:`fenced_insert_sql`); False when the
        lease is gone. A flush that would pass the cap inserts nothing there and is
        finished by the ordinary path, with the counter the statement raised."""
        cappable, params = fenced_params(run_id, epoch, entries, self.max_entries_per_run)
        found = fetch_one(conn, fenced_insert_sql(len(entries)), params)
        if found is None:
            return False
        EntryLocks.of(conn).took(run_lock_key(run_id))
        if found[3]:
            touched = conn.info.get(_TOUCHED)
            if touched is not None:
                touched.add(run_id)
            return True
        row = _Fenced(found[0], found[1], found[2])
        self._insert_entries(conn, entries, counted={run_id: row} if cappable else None)
        return True

    def _insert_entries(
        self,
        conn: Connection,
        entries: Iterable[NewEntry],
        *,
        counted: Mapping[str, Any] | None = None,
        made: Mapping[int, tuple[Any, ...]] | None = None,
    ) -> None:
        """Insert entries (on PostgreSQL after :meth:`_order_entries`).

        ``counted``: runs whose cap counter this transaction already raised by their
        cappable entries, with the row that UPDATE returned (see :meth:`_apply_cap`).
        ``made``: SQLite rows made already, by ``id`` of their entry.
        """
        entries = self._apply_cap(conn, list(entries), counted or {})
        touched = conn.info.get(_TOUCHED)
        if touched is not None:
            touched.update(e.run_id for e in entries)
        # The driver directly: SQLAlchemy's per-row bind processing would cost more than
        # the insert itself. Values are stored exactly as the Core column types store them.
        if self.dialect == "postgresql":
            rows = [_entry_row(e, e.occurred_at) for e in entries]
            if rows:
                self._order_entries(conn, {row[0] for row in rows})
                self._insert_pg(conn, rows)
            return
        made = made or {}
        texts = [made.get(id(e)) or _sqlite_row(e) for e in entries]
        most = _sqlite_rows_per_insert(cast(sqlite3.Connection, conn.connection.driver_connection))
        for start, size in _sqlite_chunks(len(texts), most):
            conn.exec_driver_sql(
                _sqlite_insert_sql(size),
                tuple(value for row in texts[start : start + size] for value in row),
            )

    def _apply_cap(
        self, conn: Connection, entries: list[NewEntry], counted: Mapping[str, Any]
    ) -> list[NewEntry]:
        """Keep each run within ``max_entries_per_run`` info entries; count what is dropped.

        The counters live on the run row, updated in this transaction (its row lock
        is taken before the entry locks, as everywhere). A run in ``counted``
        had its ``entry_count`` raised already (by the fence's UPDATE), which
        returned the row given.
        """
        cap = self.max_entries_per_run
        if cap is None or not entries:
            return entries
        low: dict[str, int] = {}
        for e in entries:
            if _cappable(e):
                low[e.run_id] = low.get(e.run_id, 0) + 1
        allowed: dict[str, int] = {}
        notes: list[NewEntry] = []
        for run_id, count in low.items():
            row = (
                counted.get(run_id)
                or conn.execute(
                    update(runs)
                    .where(runs.c.id == run_id)
                    .values(entry_count=runs.c.entry_count + count)
                    .returning(runs.c.entry_count, runs.c.entries_dropped, runs.c.pipeline)
                ).first()
            )
            if row is None:
                allowed[run_id] = count
                continue
            before = row.entry_count - count
            allowed[run_id] = max(0, min(count, cap - before))
            dropped = count - allowed[run_id]
            if not dropped:
                continue
            conn.execute(
                update(runs)
                .where(runs.c.id == run_id)
                .values(
                    entry_count=before + allowed[run_id],
                    entries_dropped=runs.c.entries_dropped + dropped,
                )
            )
            metrics.count(conn, row.pipeline, metrics.DROPPED, "", dropped)
            if row.entries_dropped == 0:
                notes.append(_truncation_entry(run_id, cap, dropped, final=False))
        kept: list[NewEntry] = []
        for e in entries:
            if _cappable(e):
                if allowed[e.run_id] <= 0:
                    continue
                allowed[e.run_id] -= 1
            kept.append(e)
        return kept + notes

    def _insert_pg(self, conn: Connection, rows: list[tuple[Any, ...]]) -> None:
        columns = ", ".join(_ENTRY_COLUMNS)
        if len(rows) <= SMALL_BATCH:
            # A slice's two entries: one multi-row INSERT beats COPY's extra messages. The
            # transaction's counters ride on it (a checkpoint's rows): no round trip of their own.
            values = ", ".join(["(%s, %s, %s, %s, %s::jsonb, %s, %s, %s)"] * len(rows))
            counters, params = metrics.pending_cte(conn)
            conn.exec_driver_sql(
                f"{counters}INSERT INTO log_entries ({columns}) VALUES {values}",  # noqa: S608 - constant
                params + tuple(value for row in rows for value in row),
            )
            return
        raw = conn.connection.driver_connection
        assert raw is not None
        with (
            raw.cursor() as cursor,
            cursor.copy(f"COPY log_entries ({columns}) FROM STDIN") as copy,
        ):
            for row in rows:
                copy.write_row(row)

    def _order_entries(self, conn: Connection, run_ids: Iterable[str]) -> None:
        """Before an insert: take the entry lock of each run written for, and register.

        A PostgreSQL sequence hands out ids at INSERT time, but transactions may
        commit in another order. Two things keep the id a gap-free cursor without
        serialising unrelated runs (``docs/design.md``, Events):

        - one run's writers take turns on its entry lock, held from before their
          insert to their commit, so *within a run* id order is commit order;
        - each writer holds a shared lock whose key is its position (the sequence's
          last value before its insert), so a cross-run reader can tell the lowest
          id still in flight (:data:`HORIZON_SQL`) and read only below it.

        Run locks are taken in key order, after every row lock of the transaction,
        so they cannot deadlock. SQLite serialises writers anyway.
        """
        locks = EntryLocks.of(conn)
        keys = sorted({run_lock_key(run_id) for run_id in run_ids} - locks.runs)
        if locks.registered and not keys:
            return
        sql = _LOCK_RUNS if locks.registered else _LOCK_RUNS_AND_REGISTER
        conn.exec_driver_sql(sql, (keys,))
        locks.runs.update(keys)
        locks.registered = True
