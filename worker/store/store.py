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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    Integer,
    Update,
    bindparam,
    func,
    insert,
    literal,
    literal_column,
    or_,
    select,
    tuple_,
    update,
)
from sqlalchemy.sql.expression import ClauseElement

from worker.errors import IllegalTransition, LeaseLost, RunNotFound
from worker.models import (
    TERMINAL,
    Lease,
    NewEntry,
    Run,
    Status,
    Trigger,
    can_transition,
)
from worker.scrub import describe
from worker.store import metrics, migrate
from worker.store.console import ConsoleQueries
from worker.store.engine import aware, db_epoch, make_engine, utcnow
from worker.store.entries import (
    _LOCKS,
    _TOUCHED,
    POSITION_SQL,
    RUN_ENTRY_LOCK,
    EntryLocks,
    EntryWrites,
    _cappable,
    _truncation_entry,
    run_lock_key,
)
from worker.store.external import ExternalWrites
from worker.store.flusher import EntryFlusher
from worker.store.maintenance import MaintenanceQueries
from worker.store.metrics import MetricQueries
from worker.store.pipelines import PipelineQueries, active_runs_clause
from worker.store.reads import EntryReads
from worker.store.sessions import SessionQueries
from worker.store.tables import queued_run, run_from_row, runs
from worker.store.tokens import TokenQueries
from worker.store.transitions import RunTransitions
from worker.store.webhooks import WebhookQueries

_log = logging.getLogger("quarry.store")

#: First key of the per-pipeline advisory lock (PostgreSQL) that makes the
#: ``max_active_runs`` count and the acquire one atomic step; the second is the
#: pipeline name's hash (the run entry locks have another first key).
PIPELINE_LOCK = 0x5152_5259


@dataclass(frozen=True, slots=True)
class Waiting:
    """An acquire refused because ``max_active_runs`` runs of the pipeline are active."""

    blocker: str
    limit: int


@functools.lru_cache(maxsize=64)
def _fence_update(names: tuple[str, ...], add_entries: bool, order_entries: bool) -> Update:
    """The holder's conditional UPDATE of ``names``, every value bound by name.

    Binds: ``fence_run``, ``fence_epoch``, ``set_<column>`` and, with
    ``add_entries``, ``add_entries`` (added to ``entry_count``). With
    ``order_entries`` it also takes the run's entry lock and registers the writer
    (PostgreSQL; bind ``run_lock``).
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
        .returning(
            runs.c.cancel_requested,
            runs.c.entries_dropped,
            runs.c.entry_count,
            runs.c.pipeline,
            runs.c.started_at,
        )
    )
    if order_entries:
        stmt = stmt.returning(
            func.pg_advisory_xact_lock(
                literal_column(str(RUN_ENTRY_LOCK)), bindparam("run_lock", type_=Integer())
            ),
            func.pg_advisory_xact_lock_shared(literal_column(f"({POSITION_SQL})")),
        )
    return stmt


class Store(
    EntryWrites,
    RunTransitions,
    EntryReads,
    TokenQueries,
    SessionQueries,
    ConsoleQueries,
    MaintenanceQueries,
    WebhookQueries,
    ExternalWrites,
    PipelineQueries,
    MetricQueries,
):
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
        self._flushers: list[EntryFlusher] = []
        # SQLite readers must not take the write lock that writers take at BEGIN.
        self._reader: Engine = (
            make_engine(url, immediate=False) if self.dialect == "sqlite" else self.engine
        )

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[Connection]:
        """A write transaction; after it commits, ``on_entries`` hears which runs got entries.

        The counters it raised (:mod:`worker.store.metrics`) are written last, before the commit.
        """
        touched: set[str] = set()
        with self.engine.begin() as conn:
            conn.info[_TOUCHED] = touched
            try:
                yield conn
                metrics.flush(conn, self.dialect)
            finally:
                conn.info.pop(_TOUCHED, None)
                conn.info.pop(_LOCKS, None)
                metrics.discard(conn)
        if touched:
            self.notify_entries(touched)

    def notify_entries(self, touched: set[str]) -> None:
        """Tell ``on_entries`` which runs a commit gave entries (stream wake-ups)."""
        if self.on_entries is None:
            return
        try:
            self.on_entries(touched)
        except Exception as exc:
            # One line: a Redis outage must not print a traceback per commit.
            _log.warning("entry notification failed: %s", describe(exc))

    def entry_flusher(self) -> EntryFlusher:
        """A log writer's ``append``: :meth:`append_entries`, with a single lease's small
        batches sent on a connection kept for it (:mod:`worker.store.flusher`)."""
        flusher = EntryFlusher(self)
        self._flushers.append(flusher)
        return flusher

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
        for flusher in self._flushers:
            flusher.close()
        self.engine.dispose()
        if self._reader is not self.engine:
            self._reader.dispose()

    # -- schema ---------------------------------------------------------------

    def upgrade(self) -> tuple[str | None, str | None]:
        """Apply Alembic migrations up to head; returns the revisions before and after."""
        before = migrate.current_revision(self.engine)
        migrate.upgrade(self.engine)
        return before, migrate.current_revision(self.engine)

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
        trigger: Trigger = Trigger.MANUAL,
        triggered_by: str | None = None,
        interval: tuple[datetime, datetime] | None = None,
    ) -> Run:
        """Store a new ``queued`` run and return it."""
        values = queued_run(
            pipeline,
            params,
            utcnow(),
            gateway=gateway,
            trigger=trigger.value,
            triggered_by=triggered_by,
            interval_start=interval[0] if interval else None,
            interval_end=interval[1] if interval else None,
        )
        if run_id is not None:
            values["id"] = run_id
        with self._transaction() as conn:
            conn.execute(insert(runs).values(**values))
        return self.get_run(str(values["id"]))

    def get_run(self, run_id: str) -> Run:
        """The run with this id; raises :class:`RunNotFound`."""
        with self._reader.connect() as conn:
            row = conn.execute(select(runs).where(runs.c.id == run_id)).first()
        if row is None:
            raise RunNotFound(run_id)
        return run_from_row(row)

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
            return [run_from_row(row) for row in conn.execute(query)]

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
        *,
        max_active: int | None = None,
        on_wait: Callable[[str], Sequence[NewEntry]] = lambda _blocker: (),
    ) -> Lease | Waiting | None:
        """Take the lease on a queued run; None when it is not claimable.

        One conditional UPDATE decides, checked by its rowcount; it bumps the
        epoch, the fencing token. ``entries`` builds the entries (such as
        ``lease_acquired``) committed in the same transaction. A run waiting for
        its retry (``not_before`` ahead) is not claimable yet.

        With ``max_active``, the UPDATE also requires fewer than that many other
        runs of the pipeline to be active (started and not ended), counted in the
        same statement under a per-pipeline lock (PostgreSQL's advisory lock;
        SQLite's write lock, taken at BEGIN): four workers racing for four runs
        start exactly ``max_active`` of them. A refused run gets :class:`Waiting`,
        its ``waiting_for`` set and, when that changed, the ``on_wait`` entries.
        """
        now = utcnow()
        stmt = (
            update(runs)
            .where(
                runs.c.id == run_id,
                runs.c.status == Status.QUEUED.value,
                runs.c.cancel_requested.is_(False),
                or_(runs.c.lease_owner.is_(None), runs.c.lease_expires_at < db_epoch()),
                or_(runs.c.not_before.is_(None), runs.c.not_before <= now),
            )
            .values(
                status=Status.RUNNING.value,
                lease_owner=owner,
                lease_epoch=runs.c.lease_epoch + 1,
                lease_expires_at=db_epoch() + ttl_seconds,
                heartbeat_at=now,
                started_at=func.coalesce(runs.c.started_at, now),
                updated_at=now,
                waiting_for=None,
            )
            .returning(
                runs.c.lease_epoch,
                runs.c.attempt,
                runs.c.lease_expires_at,
                runs.c.pipeline,
                runs.c.created_at,
                runs.c.started_at,
            )
        )
        with self._transaction() as conn:
            pipeline: str | None = None
            if max_active is not None:
                pipeline = conn.execute(
                    select(runs.c.pipeline).where(runs.c.id == run_id)
                ).scalar_one_or_none()
                if pipeline is None:
                    return None
                if self.dialect == "postgresql":
                    conn.execute(
                        select(func.pg_advisory_xact_lock(PIPELINE_LOCK, func.hashtext(pipeline)))
                    )
                active, clause = active_runs_clause(runs.c.pipeline, exclude=runs.c.id)
                count = select(func.count()).select_from(active).where(clause).scalar_subquery()
                stmt = stmt.where(count < max_active)
            row = conn.execute(stmt).first()
            if row is None:
                if pipeline is None or max_active is None:
                    return None
                return self._waiting(conn, run_id, pipeline, max_active, on_wait)
            lease = Lease(run_id, owner, row.lease_epoch, row.attempt, row.lease_expires_at)
            if aware(row.started_at) == now:  # its first lease: the run starts
                metrics.count_started(conn, row.pipeline, row.created_at, now)
            self._insert_entries(conn, entries(lease))
        return lease

    def _waiting(
        self,
        conn: Connection,
        run_id: str,
        pipeline: str,
        limit: int,
        on_wait: Callable[[str], Sequence[NewEntry]],
    ) -> Waiting | None:
        """Why an acquire under ``max_active_runs`` failed: Waiting if the limit held it back."""
        current = conn.execute(
            select(runs.c.status, runs.c.cancel_requested, runs.c.waiting_for).where(
                runs.c.id == run_id
            )
        ).first()
        if current is None or current.status != Status.QUEUED.value or current.cancel_requested:
            return None
        active, clause = active_runs_clause(pipeline, exclude=run_id)
        blockers = conn.execute(
            select(active.c.id).where(clause).order_by(active.c.started_at).limit(limit)
        ).scalars()
        found = list(blockers)
        if len(found) < limit:
            return None  # not the limit: a lease still held, a retry not yet due
        blocker = found[0]
        if current.waiting_for != blocker:
            conn.execute(update(runs).where(runs.c.id == run_id).values(waiting_for=blocker))
            self._insert_entries(conn, on_wait(blocker))
        return Waiting(blocker, limit)

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
        loaded: tuple[int, int] | None = None,
    ) -> None:
        """One fenced transaction: checkpoint, summary and entries land together or not at all.

        ``before_commit`` runs after the fence while the lock is held, so what it
        does (publishing a slice file) cannot race a takeover. ``loaded`` is the
        ``(rows, bytes)`` of the slice this checkpoint records, added to the
        pipeline's counters in the same transaction: a slice is counted once, since a
        resumed run never redoes a slice its checkpoint holds.
        """
        values: dict[str, Any] = {"updated_at": utcnow()}

        def count(conn: Connection, row: Any) -> None:
            if loaded is not None:
                metrics.count(conn, row.pipeline, metrics.ROWS, "", loaded[0])
                metrics.count(conn, row.pipeline, metrics.BYTES, "", loaded[1])

        self._fenced_write(
            lease,
            values,
            entries,
            checkpoint=checkpoint,
            summary=summary,
            before_commit=before_commit,
            count_metrics=count if loaded is not None else None,
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
        before_commit: Callable[[], None] | None = None,
        interruption: str = "sigterm",
        cleanup_owed: bool = False,
    ) -> None:
        """End the holder's tenure: set ``status``, release the lease, write the entries.

        ``before_commit`` runs inside the fenced transaction (a destination's replace
        swap): it happens if and only if this holder still owned the run.
        ``interruption`` is the kind an ``interrupted`` end is counted as (the signal).
        ``cleanup_owed``: the holder ends the run but cannot clean up after it (its
        process is about to be ended); the watchdog does (:mod:`worker.cleanup`).
        """
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
        if cleanup_owed:
            values["cleanup_owed"] = True

        def count(conn: Connection, row: Any) -> None:
            if status in TERMINAL:
                metrics.count_ended(conn, row.pipeline, status, row.started_at, now)
            else:
                metrics.count(conn, row.pipeline, metrics.INTERRUPTIONS, f"kind={interruption}")

        self._fenced_write(
            lease,
            values,
            entries,
            checkpoint=checkpoint,
            summary=summary,
            final=True,
            before_commit=before_commit,
            count_metrics=count,
        )
        if status in TERMINAL:
            self._ended(lease.run_id)

    def requeue_for_retry(
        self,
        lease: Lease,
        entries: Sequence[NewEntry],
        *,
        not_before: datetime,
        error_summary: str,
        summary: dict[str, Any] | None = None,
    ) -> None:
        """End the holder's attempt and queue the run's next one, due at ``not_before``.

        The checkpoint stays: the retry resumes where this attempt stopped. The run
        keeps its ``max_active_runs`` slot (it has started), so no later run overtakes it.
        """
        values: dict[str, Any] = {
            "status": Status.QUEUED.value,
            "lease_owner": None,
            "lease_expires_at": None,
            "attempt": runs.c.attempt + 1,
            "retries": runs.c.retries + 1,
            "not_before": not_before,
            # The watchdog's lost-message clock starts when the retry is due.
            "queued_at": not_before,
            "error_summary": error_summary,
            "attempt_reason": f"retry of attempt {lease.attempt}",
            "updated_at": utcnow(),
        }
        self._fenced_write(
            lease,
            values,
            entries,
            checkpoint=None,
            summary=summary,
            final=True,
            count_metrics=lambda conn, row: metrics.count(
                conn, row.pipeline, metrics.INTERRUPTIONS, "kind=retry"
            ),
        )

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
        count_metrics: Callable[[Connection, Any], None] | None = None,
    ) -> None:
        """Fence, write the run row's ``values`` and the entries, then ``before_commit``.

        ``final`` (the holder's last write) adds the closing ``log_truncated`` count.
        ``count_metrics`` raises the pipeline's counters, given the fenced row (its pipeline).
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
            if count_metrics is not None:
                count_metrics(conn, row)
            if final and row.entries_dropped and self.max_entries_per_run is not None:
                closing = _truncation_entry(
                    lease.run_id, self.max_entries_per_run, row.entries_dropped, final=True
                )
                entries = [*entries[:-1], closing, *entries[-1:]]
            self._insert_entries(conn, entries, counted={lease.run_id: row} if counted else None)
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

        With ``order_entries`` on PostgreSQL the run's entry lock is taken and the
        writer registered in the same statement (``RETURNING pg_advisory_xact_lock(…)``),
        saving a round trip on every checkpoint; still after the row lock.
        """
        plain = {k: v for k, v in values.items() if not isinstance(v, ClauseElement)}
        lock = order_entries and self.dialect == "postgresql"
        stmt = _fence_update(tuple(sorted(plain)), add_entries > 0, lock)
        if len(plain) < len(values):  # SQL expressions (renew's lease deadline): a new statement
            stmt = stmt.values({k: v for k, v in values.items() if k not in plain})
        params = {f"set_{k}": v for k, v in plain.items()}
        params.update(fence_run=lease.run_id, fence_epoch=lease.epoch, add_entries=add_entries)
        if lock:
            params["run_lock"] = run_lock_key(lease.run_id)
        row = conn.execute(stmt, params).first()
        if row is None:
            raise LeaseLost(f"{lease.run_id} epoch {lease.epoch}")
        if lock:
            EntryLocks.of(conn).took(params["run_lock"])
        return row
