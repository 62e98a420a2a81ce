"""Transitions made by non-holders (the watchdog, operators): conditional on the state the
caller saw, so two of them racing change a run once. Mixed into ``Store``."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine, and_, or_, select, update

from worker.errors import IllegalTransition
from worker.models import TERMINAL, NewEntry, Run, Status, can_transition
from worker.store import metrics
from worker.store.engine import db_epoch, utcnow
from worker.store.tables import run_from_row, runs


class RunTransitions:
    """Status changes by callers that hold no lease (mixed into ``Store``)."""

    _reader: Engine

    if TYPE_CHECKING:

        def _transaction(self) -> contextlib.AbstractContextManager[Connection]: ...

        def _insert_entries(self, conn: Connection, entries: Sequence[NewEntry]) -> None: ...

        def _ended(self, run_id: str) -> None: ...

        def get_run(self, run_id: str) -> Run: ...

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
        attempt_reason: str | None = None,
        recovery: str | None = None,
        interruption: str | None = None,
    ) -> bool:
        """Move a run ``expected`` → ``target`` unless someone moved it first.

        The epoch is bumped, so a holder that is still alive (a frozen process)
        finds its lease lost on its next write. Returns whether this call won.
        An end is counted by status; ``recovery`` and ``interruption`` name the kind
        this change is counted as, if it is one (:mod:`worker.store.metrics`).
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
            if expected is Status.RUNNING:
                # Ended over its worker's head: its write modes' cleanup falls to the watchdog
                # (not a gateway's run: its runner writes its output, not Quarry).
                values["cleanup_owed"] = runs.c.gateway.is_(None)
        if bump_attempt:
            values["attempt"] = runs.c.attempt + 1
            values["attempt_reason"] = attempt_reason[:300] if attempt_reason else None
        if error_summary is not None:
            values["error_summary"] = error_summary
        conditions = [runs.c.id == run_id, runs.c.status == expected.value]
        if expected_epoch is not None:
            conditions.append(runs.c.lease_epoch == expected_epoch)
        with self._transaction() as conn:
            row = conn.execute(
                update(runs)
                .where(and_(*conditions))
                .values(**values)
                .returning(runs.c.pipeline, runs.c.started_at)
            ).first()
            if row is None:
                return False
            if target in TERMINAL:
                metrics.count_ended(conn, row.pipeline, target, row.started_at, now)
            if recovery is not None:
                metrics.count(conn, row.pipeline, metrics.RECOVERIES, f"kind={recovery}")
            if interruption is not None:
                metrics.count(conn, row.pipeline, metrics.INTERRUPTIONS, f"kind={interruption}")
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
            return [run_from_row(row) for row in conn.execute(query)]

    def owed_cleanups(self, ended_before: datetime, limit: int = 20) -> list[Run]:
        """Runs ended without their worker before ``ended_before``, whose write-mode cleanup
        nobody has done yet (oldest first)."""
        query = (
            select(runs)
            .where(runs.c.cleanup_owed, runs.c.finished_at < ended_before)
            .order_by(runs.c.finished_at)
            .limit(limit)
        )
        with self._reader.connect() as conn:
            return [run_from_row(row) for row in conn.execute(query)]

    def claim_cleanup(self, run_id: str) -> bool:
        """Take ``run_id``'s owed cleanup; False when another sweep or its worker took it."""
        with self._transaction() as conn:
            claimed = conn.execute(
                update(runs)
                .where(runs.c.id == run_id, runs.c.cleanup_owed)
                .values(cleanup_owed=False)
            ).rowcount
        return claimed == 1

    def claim_republish(
        self, run_id: str, queued_at: datetime, entries: Sequence[NewEntry] = ()
    ) -> bool:
        """Restart a queued run's clock before re-publishing it; False if another sweep did.

        Counted as a ``republish`` recovery.
        """
        with self._transaction() as conn:
            row = conn.execute(
                update(runs)
                .where(
                    runs.c.id == run_id,
                    runs.c.status == Status.QUEUED.value,
                    runs.c.queued_at == queued_at,
                )
                .values(queued_at=utcnow(), updated_at=utcnow())
                .returning(runs.c.pipeline)
            ).first()
            if row is None:
                return False
            metrics.count(conn, row.pipeline, metrics.RECOVERIES, "kind=republish")
            self._insert_entries(conn, entries)
        return True
