"""The run-log store: every database operation Quarry performs, behind one interface.

Nothing outside this package builds a query. Writes made by a lease holder are
*fenced*: they run in a transaction that first updates the run row on the
condition ``lease_epoch = :mine`` and raise :class:`LeaseLost` when that
matches nothing. The fence update takes the row's write lock (PostgreSQL) or
the database write lock (SQLite, ``BEGIN IMMEDIATE``), so a takeover cannot
commit between the check and the writes that follow it in the transaction.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import secrets
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    Integer,
    Update,
    and_,
    bindparam,
    delete,
    func,
    insert,
    literal,
    or_,
    select,
    tuple_,
    update,
)
from sqlalchemy.sql.expression import ClauseElement

from worker.errors import IllegalTransition, LeaseLost, RunNotFound
from worker.jsonfmt import dumps, loads
from worker.models import (
    TERMINAL,
    TERMINAL_EVENTS,
    Event,
    Lease,
    Level,
    NewEntry,
    Run,
    Status,
    can_transition,
)
from worker.scrub import describe
from worker.store import migrate
from worker.store.engine import aware, db_epoch, make_engine, utcnow
from worker.store.external import ExternalWrites
from worker.store.maintenance import MaintenanceQueries
from worker.store.reads import EntryReads
from worker.store.tables import log_entries, runs
from worker.store.tokens import TokenQueries
from worker.store.webhooks import WebhookQueries

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


_log = logging.getLogger("quarry.store")

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


@functools.lru_cache(maxsize=64)
def _fence_update(names: tuple[str, ...], add_entries: bool, order_entries: bool) -> Update:
    """The holder's conditional UPDATE of ``names``, every value bound by name.

    Binds: ``fence_run``, ``fence_epoch``, ``set_<column>`` and, with
    ``add_entries``, ``add_entries`` (added to ``entry_count``). With
    ``order_entries`` it also takes the entry-order lock (PostgreSQL).
    """
    values: dict[str, Any] = {
        name: bindparam(f"set_{name}", type_=runs.c[name].type) for name in names
    }
    if add_entries:
        values["entry_count"] = runs.c.entry_count + bindparam("add_entries", type_=Integer())
    stmt = (
        update(runs)
        .where(
            runs.c.id == bindparam("fence_run"),
            runs.c.lease_epoch == bindparam("fence_epoch"),
            runs.c.status == Status.RUNNING.value,
        )
        .values(values)
        .returning(runs.c.cancel_requested, runs.c.entries_dropped, runs.c.entry_count)
    )
    if order_entries:
        stmt = stmt.returning(func.pg_advisory_xact_lock(ENTRY_ORDER_LOCK))
    return stmt


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


def new_run_id() -> str:
    """A fresh, unguessable run id."""
    return f"run_{secrets.token_hex(8)}"


def _run_from_row(row: Any) -> Run:
    return Run(
        id=row.id,
        pipeline=row.pipeline,
        status=Status(row.status),
        attempt=row.attempt,
        params=row.params or {},
        gateway=row.gateway,
        lease_owner=row.lease_owner,
        lease_epoch=row.lease_epoch,
        lease_expires_at=row.lease_expires_at,
        heartbeat_at=aware(row.heartbeat_at),
        checkpoint=row.checkpoint or {},
        telemetry_summary=row.telemetry_summary or {},
        error_summary=row.error_summary,
        cancel_requested=bool(row.cancel_requested),
        created_at=aware(row.created_at) or utcnow(),
        queued_at=aware(row.queued_at) or utcnow(),
        started_at=aware(row.started_at),
        finished_at=aware(row.finished_at),
        updated_at=aware(row.updated_at) or utcnow(),
    )


class Store(EntryReads, TokenQueries, MaintenanceQueries, WebhookQueries, ExternalWrites):
    """All of Quarry's database access: runs, leases, checkpoints, entries, telemetry."""

    def __init__(self, url: str, *, max_entries_per_run: int | None = None) -> None:
        self.url = url
        #: Info and debug entries kept per run; past it they are dropped (warnings and errors
        #: never are) and ``log_truncated`` entries count what was dropped. None: no cap.
        self.max_entries_per_run = max_entries_per_run
        self.engine: Engine = make_engine(url)
        self.dialect = self.engine.dialect.name
        #: Called with the run ids that got new entries, after each commit (stream wake-ups).
        self.on_entries: Callable[[set[str]], None] | None = None
        #: Called with a run id after the commit that ended it (webhooks).
        self.on_ended: Callable[[str], None] | None = None
        # SQLite readers must not take the write lock that writers take at BEGIN.
        self._reader: Engine = (
            make_engine(url, immediate=False) if self.dialect == "sqlite" else self.engine
        )

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[Connection]:
        """A write transaction; after it commits, ``on_entries`` hears which runs got entries."""
        touched: set[str] = set()
        with self.engine.begin() as conn:
            conn.info[_TOUCHED] = touched
            try:
                yield conn
            finally:
                conn.info.pop(_TOUCHED, None)
        if touched and self.on_entries is not None:
            try:
                self.on_entries(touched)
            except Exception as exc:
                # One line: a Redis outage must not print a traceback per commit.
                _log.warning("entry notification failed: %s", describe(exc))

    def _ended(self, run_id: str) -> None:
        if self.on_ended is None:
            return
        try:
            self.on_ended(run_id)
        except Exception as exc:
            # One line: an unreachable broker must not bury the caller's own error.
            _log.warning("run-ended hook failed for %s: %s", run_id, describe(exc))

    def close(self) -> None:
        """Release every pooled connection."""
        self.engine.dispose()
        if self._reader is not self.engine:
            self._reader.dispose()

    # -- schema ---------------------------------------------------------------

    def upgrade(self) -> None:
        """Apply Alembic migrations up to head."""
        migrate.upgrade(self.engine)

    def schema_is_current(self) -> bool:
        """Whether the schema is at the newest migration."""
        return migrate.is_current(self._reader)

    def ping(self) -> None:
        """Round-trip to the database; raises when it is unreachable."""
        with self._reader.connect() as conn:
            conn.execute(select(literal(1)))

    # -- runs -----------------------------------------------------------------

    def create_run(
        self,
        pipeline: str,
        params: dict[str, Any] | None = None,
        *,
        gateway: str | None = None,
        run_id: str | None = None,
    ) -> Run:
        """Store a new ``queued`` run and return it."""
        now = utcnow()
        values = {
            "id": run_id or new_run_id(),
            "pipeline": pipeline,
            "status": Status.QUEUED.value,
            "attempt": 1,
            "params": params or {},
            "gateway": gateway,
            "lease_epoch": 0,
            "checkpoint": {},
            "telemetry_summary": {},
            "cancel_requested": False,
            "created_at": now,
            "queued_at": now,
            "updated_at": now,
        }
        with self._transaction() as conn:
            conn.execute(insert(runs).values(**values))
        return self.get_run(str(values["id"]))

    def get_run(self, run_id: str) -> Run:
        """The run with this id; raises :class:`RunNotFound`."""
        with self._reader.connect() as conn:
            row = conn.execute(select(runs).where(runs.c.id == run_id)).first()
        if row is None:
            raise RunNotFound(run_id)
        return _run_from_row(row)

    def list_runs(
        self,
        *,
        status: Status | None = None,
        pipeline: str | None = None,
        gateway: str | None = None,
        cursor: str | None = None,
        limit: int = 50,
        oldest_first: bool = False,
    ) -> list[Run]:
        """Runs, newest first (or oldest first), filtered in the query; ``cursor`` is the last
        run id of the previous page.

        A gateway's queue (``status`` queued, ``gateway``, ``oldest_first``: its claim
        order) reads an index of its own, so other gateways' backlogs cost nothing. A
        ``cursor`` run outside ``gateway`` raises :class:`RunNotFound` as an unknown id
        does, so a cursor cannot tell whether another gateway's run exists.
        """
        order = (runs.c.created_at, runs.c.id)
        query = (
            select(runs)
            .order_by(*(order if oldest_first else (c.desc() for c in order)))
            .limit(limit)
        )
        if status is not None:
            query = query.where(runs.c.status == status.value)
        if pipeline is not None:
            query = query.where(runs.c.pipeline == pipeline)
        if gateway is not None:
            query = query.where(runs.c.gateway == gateway)
        with self._reader.connect() as conn:
            if cursor is not None:
                marks = select(runs.c.created_at, runs.c.id).where(runs.c.id == cursor)
                if gateway is not None:
                    marks = marks.where(runs.c.gateway == gateway)
                mark = conn.execute(marks).first()
                if mark is None:
                    raise RunNotFound(cursor)
                # Keyset: strictly past the mark in the page order.
                query = query.where(
                    tuple_(*order) > tuple(mark) if oldest_first else tuple_(*order) < tuple(mark)
                )
            return [_run_from_row(row) for row in conn.execute(query)]

    def db_time(self) -> float:
        """The database clock, seconds since the Unix epoch."""
        with self._reader.connect() as conn:
            return float(conn.execute(select(db_epoch())).scalar_one())

    # -- the lease ------------------------------------------------------------

    def acquire(
        self,
        run_id: str,
        owner: str,
        ttl_seconds: float,
        entries: Callable[[Lease], Sequence[NewEntry]] = lambda _lease: (),
    ) -> Lease | None:
        """Take the lease on a queued run; None when it is not claimable.

        One conditional UPDATE decides, checked by its rowcount; it bumps the
        epoch, the fencing token. ``entries`` builds the entries (such as
        ``lease_acquired``) committed in the same transaction.
        """
        now = utcnow()
        stmt = (
            update(runs)
            .where(
                runs.c.id == run_id,
                runs.c.status == Status.QUEUED.value,
                runs.c.cancel_requested.is_(False),
                or_(runs.c.lease_owner.is_(None), runs.c.lease_expires_at < db_epoch()),
            )
            .values(
                status=Status.RUNNING.value,
                lease_owner=owner,
                lease_epoch=runs.c.lease_epoch + 1,
                lease_expires_at=db_epoch() + ttl_seconds,
                heartbeat_at=now,
                started_at=func.coalesce(runs.c.started_at, now),
                updated_at=now,
            )
            .returning(runs.c.lease_epoch, runs.c.attempt, runs.c.lease_expires_at)
        )
        with self._transaction() as conn:
            row = conn.execute(stmt).first()
            if row is None:
                return None
            lease = Lease(run_id, owner, row.lease_epoch, row.attempt, row.lease_expires_at)
            self._insert_entries(conn, entries(lease))
        return lease

    def renew(
        self, lease: Lease, ttl_seconds: float, summary: dict[str, Any] | None = None
    ) -> bool:
        """Extend the lease (and store the telemetry summary); returns ``cancel_requested``."""
        values: dict[str, Any] = {
            "lease_expires_at": db_epoch() + ttl_seconds,
            "heartbeat_at": utcnow(),
        }
        if summary is not None:
            values["telemetry_summary"] = summary
        with self._transaction() as conn:
            row = self._fence(conn, lease, values)
        return bool(row.cancel_requested)

    def commit(
        self,
        lease: Lease,
        entries: Sequence[NewEntry] = (),
        *,
        checkpoint: dict[str, Any] | None = None,
        summary: dict[str, Any] | None = None,
        before_commit: Callable[[], None] | None = None,
    ) -> None:
        """One fenced transaction: checkpoint, summary and entries land together or not at all.

        ``before_commit`` runs after the fence while the lock is held, so what it
        does (publishing a slice file) cannot race a takeover.
        """
        values: dict[str, Any] = {"updated_at": utcnow()}
        self._fenced_write(
            lease,
            values,
            entries,
            checkpoint=checkpoint,
            summary=summary,
            before_commit=before_commit,
        )

    def finish(
        self,
        lease: Lease,
        status: Status,
        entries: Sequence[NewEntry] = (),
        *,
        error_summary: str | None = None,
        checkpoint: dict[str, Any] | None = None,
        summary: dict[str, Any] | None = None,
    ) -> None:
        """End the holder's tenure: set ``status``, release the lease, write the entries."""
        if not can_transition(Status.RUNNING, status) or status is Status.QUEUED:
            raise IllegalTransition(f"{Status.RUNNING} -> {status}")
        now = utcnow()
        values: dict[str, Any] = {
            "status": status.value,
            "lease_owner": None,
            "lease_expires_at": None,
            "updated_at": now,
        }
        if status in TERMINAL:
            values["finished_at"] = now
        if error_summary is not None:
            values["error_summary"] = error_summary
        self._fenced_write(
            lease, values, entries, checkpoint=checkpoint, summary=summary, final=True
        )
        if status in TERMINAL:
            self._ended(lease.run_id)

    def _fenced_write(
        self,
        lease: Lease,
        values: dict[str, Any],
        entries: Sequence[NewEntry],
        *,
        checkpoint: dict[str, Any] | None,
        summary: dict[str, Any] | None,
        before_commit: Callable[[], None] | None = None,
        final: bool = False,
    ) -> None:
        """Fence, write the run row's ``values`` and the entries, then ``before_commit``.

        ``final`` (the holder's last write) adds the closing ``log_truncated`` count.
        """
        if checkpoint is not None:
            values["checkpoint"] = checkpoint
        if summary is not None:
            values["telemetry_summary"] = summary
        counted = 0
        if self.max_entries_per_run is not None:
            counted = sum(1 for e in entries if e.run_id == lease.run_id and _cappable(e))
        ordered = bool(entries)
        with self._transaction() as conn:
            # The cap's counter rides on the fence's UPDATE: a statement fewer a checkpoint.
            row = self._fence(conn, lease, values, order_entries=ordered, add_entries=counted)
            if final and row.entries_dropped and self.max_entries_per_run is not None:
                closing = _truncation_entry(
                    lease.run_id, self.max_entries_per_run, row.entries_dropped, final=True
                )
                entries = [*entries[:-1], closing, *entries[-1:]]
            self._insert_entries(
                conn, entries, ordered=ordered, counted={lease.run_id: row} if counted else None
            )
            if before_commit is not None:
                before_commit()

    def _fence(
        self,
        conn: Connection,
        lease: Lease,
        values: dict[str, Any],
        *,
        order_entries: bool = False,
        add_entries: int = 0,
    ) -> Any:
        """The holder's conditional UPDATE; raises LeaseLost when the epoch moved on.

        ``add_entries`` raises the run's cap counter (``entry_count``) in the same
        statement. The statement is built once per set of columns (:func:`_fence_update`):
        building it anew on every checkpoint cost more than a round trip
        (``python -m bench.ab REV_A REV_B slices``).

        With ``order_entries`` on PostgreSQL the entry-order lock is taken in the
        same statement (``RETURNING pg_advisory_xact_lock(…)``), saving a round
        trip on every checkpoint; it is still taken after the row lock.
        """
        plain = {k: v for k, v in values.items() if not isinstance(v, ClauseElement)}
        stmt = _fence_update(
            tuple(sorted(plain)), add_entries > 0, order_entries and self.dialect == "postgresql"
        )
        if len(plain) < len(values):  # SQL expressions (renew's lease deadline): a new statement
            stmt = stmt.values({k: v for k, v in values.items() if k not in plain})
        params = {f"set_{k}": v for k, v in plain.items()}
        params.update(fence_run=lease.run_id, fence_epoch=lease.epoch, add_entries=add_entries)
        row = conn.execute(stmt, params).first()
        if row is None:
            raise LeaseLost(f"{lease.run_id} epoch {lease.epoch}")
        return row

    # -- transitions by non-holders (watchdog, operators) -----------------------

    def transition(
        self,
        run_id: str,
        expected: Status,
        target: Status,
        entries: Sequence[NewEntry] = (),
        *,
        expected_epoch: int | None = None,
        error_summary: str | None = None,
        bump_attempt: bool = False,
    ) -> bool:
        """Move a run ``expected`` → ``target`` unless someone moved it first.

        The epoch is bumped, so a holder that is still alive (a frozen process)
        finds its lease lost on its next write. Returns whether this call won.
        """
        if not can_transition(expected, target):
            raise IllegalTransition(f"{expected} -> {target}")
        now = utcnow()
        values: dict[str, Any] = {
            "status": target.value,
            "lease_owner": None,
            "lease_expires_at": None,
            "lease_epoch": runs.c.lease_epoch + 1,
            "updated_at": now,
        }
        if target is Status.QUEUED:
            values["queued_at"] = now
        if target in TERMINAL:
            values["finished_at"] = now
        if bump_attempt:
            values["attempt"] = runs.c.attempt + 1
        if error_summary is not None:
            values["error_summary"] = error_summary
        conditions = [runs.c.id == run_id, runs.c.status == expected.value]
        if expected_epoch is not None:
            conditions.append(runs.c.lease_epoch == expected_epoch)
        with self._transaction() as conn:
            if conn.execute(update(runs).where(and_(*conditions)).values(**values)).rowcount != 1:
                return False
            self._insert_entries(conn, entries)
        if target in TERMINAL:
            self._ended(run_id)
        return True

    def request_cancel(self, run_id: str) -> bool:
        """Flag a run for cancellation; its holder sees the flag at its next renew.

        Returns False when the run had already ended.
        """
        terminal = [status.value for status in TERMINAL]
        with self._transaction() as conn:
            changed = conn.execute(
                update(runs)
                .where(runs.c.id == run_id, runs.c.status.not_in(terminal))
                .values(cancel_requested=True, updated_at=utcnow())
            ).rowcount
        if not changed:
            self.get_run(run_id)  # raises RunNotFound for an unknown id
        return bool(changed)

    def watchdog_candidates(self, queued_before: datetime, limit: int = 500) -> list[Run]:
        """Runs the watchdog must look at: expired leases, interrupted, queued too long."""
        query = (
            select(runs)
            .where(
                or_(
                    and_(
                        runs.c.status == Status.RUNNING.value,
                        runs.c.lease_expires_at < db_epoch(),
                    ),
                    runs.c.status == Status.INTERRUPTED.value,
                    and_(
                        runs.c.status == Status.QUEUED.value,
                        runs.c.queued_at < queued_before,
                    ),
                )
            )
            .order_by(runs.c.queued_at)
            .limit(limit)
        )
        with self._reader.connect() as conn:
            return [_run_from_row(row) for row in conn.execute(query)]

    def claim_republish(
        self, run_id: str, queued_at: datetime, entries: Sequence[NewEntry] = ()
    ) -> bool:
        """Restart a queued run's clock before re-publishing it; False if another sweep did."""
        with self._transaction() as conn:
            changed = conn.execute(
                update(runs)
                .where(
                    runs.c.id == run_id,
                    runs.c.status == Status.QUEUED.value,
                    runs.c.queued_at == queued_at,
                )
                .values(queued_at=utcnow(), updated_at=utcnow())
            ).rowcount
            if changed != 1:
                return False
            self._insert_entries(conn, entries)
        return True

    def replace_entries(
        self, run_id: str, entries: Sequence[NewEntry], lease: Lease | None = None
    ) -> None:
        """Replace a run's whole log (fenced on ``lease`` when one is given)."""
        with self._transaction() as conn:
            if lease is not None:
                self._fence(conn, lease, {"updated_at": utcnow()})
            conn.execute(delete(log_entries).where(log_entries.c.run_id == run_id))
            self._insert_entries(conn, entries)

    def amend_ended(
        self,
        run_id: str,
        *,
        error_summary: str | None = None,
        finished_at: datetime | None = None,
        summary: dict[str, Any] | None = None,
    ) -> bool:
        """Backfill an ended run's error summary, finish time or telemetry; False if not ended."""
        values: dict[str, Any] = {"updated_at": utcnow()}
        if error_summary is not None:
            values["error_summary"] = error_summary
        if finished_at is not None:
            values["finished_at"] = finished_at
        if summary is not None:
            values["telemetry_summary"] = summary
        terminal = [status.value for status in TERMINAL]
        with self._transaction() as conn:
            changed = conn.execute(
                update(runs)
                .where(runs.c.id == run_id, runs.c.status.in_(terminal))
                .values(**values)
            ).rowcount
        return bool(changed)

    def expire_lease(self, run_id: str) -> None:
        """Mark a run's lease expired now (what a frozen holder's silence amounts to)."""
        with self._transaction() as conn:
            conn.execute(
                update(runs).where(runs.c.id == run_id).values(lease_expires_at=db_epoch() - 1)
            )

    def expired_runs(self, limit: int = 100) -> list[Run]:
        """``running`` runs whose lease has expired on the database clock."""
        query = (
            select(runs)
            .where(runs.c.status == Status.RUNNING.value, runs.c.lease_expires_at < db_epoch())
            .limit(limit)
        )
        with self._reader.connect() as conn:
            return [_run_from_row(row) for row in conn.execute(query)]

    # -- log entries ----------------------------------------------------------

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
                touched = conn.execute(
                    update(runs)
                    .where(runs.c.id == run_id, runs.c.lease_epoch == epoch)
                    .values(lease_epoch=runs.c.lease_epoch)
                ).rowcount
                if touched != 1:
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
                    .returning(runs.c.entry_count, runs.c.entries_dropped)
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
            # A slice's two entries: one multi-row INSERT beats COPY's extra messages.
            values = ", ".join(["(%s, %s, %s, %s, %s::jsonb, %s, %s, %s)"] * len(rows))
            conn.exec_driver_sql(
                f"INSERT INTO log_entries ({columns}) VALUES {values}",  # noqa: S608 - constant
                tuple(value for row in rows for value in row),
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
