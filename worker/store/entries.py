"""The entry write path: buffered batches and state-change entries into ``log_entries``.

Mixed into :class:`~worker.store.store.Store`. Inserts go through the driver
(SQLAlchemy's per-row bind processing cost more than the insert itself); on
PostgreSQL every entry-writing transaction takes the entry-order lock so that
id order is commit order and the id is a gap-free cursor; the per-run cap on
info entries is counted on the run row in the inserting transaction.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, update

from worker.jsonfmt import dumps, loads
from worker.models import TERMINAL_EVENTS, Event, Level, NewEntry
from worker.store import metrics
from worker.store.engine import utcnow
from worker.store.tables import runs

#: Key of the PostgreSQL advisory lock that orders log-entry commits (see ``_order_entries``).
ENTRY_ORDER_LOCK = 0x5155_4152_5259  # "QUARRY"

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

#: Up to this many entries go in one INSERT; more go through COPY.
SMALL_BATCH = 50

_SQLITE_INSERT = (
    f"INSERT INTO log_entries ({', '.join(_ENTRY_COLUMNS)}) "  # noqa: S608 - constant columns
    f"VALUES ({', '.join('?' * len(_ENTRY_COLUMNS))})"
)


_LEVEL_TEXT = {level: level.value for level in Level}


def _utc_text(value: datetime) -> str:
    """A timestamp as SQLAlchemy's SQLite DateTime stores it: naive UTC, microseconds."""
    if value.tzinfo is not UTC:
        value = value.astimezone(UTC)
    return value.isoformat(" ", "microseconds")[:26]


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
    """Entry inserts, the cap and the entry-order lock (mixed into ``Store``)."""

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
        fenced: dict[tuple[str, int], None] = {}
        for entry in entries:
            if entry.epoch is not None:
                fenced[(entry.run_id, entry.epoch)] = None
        refused: set[tuple[str, int]] = set()
        with self._transaction() as conn:
            for run_id, epoch in fenced:
                if not holds(conn, run_id, epoch):
                    refused.add((run_id, epoch))
            kept = [e for e in entries if e.epoch is None or (e.run_id, e.epoch) not in refused]
            self._insert_entries(conn, kept)
        return refused

    def _insert_entries(
        self,
        conn: Connection,
        entries: Iterable[NewEntry],
        *,
        ordered: bool = False,
        counted: Mapping[str, Any] | None = None,
    ) -> None:
        """Insert entries; ``ordered`` means the entry-order lock is already held.

        ``counted``: runs whose cap counter this transaction already raised by their
        cappable entries, with the row that UPDATE returned (see :meth:`_apply_cap`).
        """
        entries = self._apply_cap(conn, list(entries), counted or {})
        touched = conn.info.get(_TOUCHED)
        if touched is not None:
            touched.update(e.run_id for e in entries)
        # The driver directly: SQLAlchemy's per-row bind processing would cost more than
        # the insert itself. Values are stored exactly as the Core column types store them.
        if self.dialect == "postgresql":
            rows = [
                _without_nul(
                    (e.run_id, _LEVEL_TEXT[e.level], e.event, e.message, dumps(e.data),
                     e.worker_id, e.attempt, e.occurred_at)
                )
                for e in entries
            ]  # fmt: skip
            if rows:
                if not ordered:
                    self._order_entries(conn)
                self._insert_pg(conn, rows)
            return
        texts = [
            _without_nul(
                (e.run_id, _LEVEL_TEXT[e.level], e.event, e.message, dumps(e.data),
                 e.worker_id, e.attempt, _utc_text(e.occurred_at))
            )
            for e in entries
        ]  # fmt: skip
        if texts:
            conn.exec_driver_sql(_SQLITE_INSERT, texts)

    def _apply_cap(
        self, conn: Connection, entries: list[NewEntry], counted: Mapping[str, Any]
    ) -> list[NewEntry]:
        """Keep each run within ``max_entries_per_run`` info entries; count what is dropped.

        The counters live on the run row, updated in this transaction (its row lock
        is taken before the entry-order lock, as everywhere). A run in ``counted``
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

    def _order_entries(self, conn: Connection) -> None:
        """Serialise entry-writing commits so ids become visible in increasing order.

        A PostgreSQL sequence hands out ids at INSERT time, but transactions may
        commit in another order; a reader paging by id could then step past an id
        that commits a moment later. Holding one transaction-scoped advisory lock
        from before the insert until the commit makes id order and commit order
        the same, so the id is a gap-free cursor. SQLite serialises writers anyway.
        """
        conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({ENTRY_ORDER_LOCK})")
