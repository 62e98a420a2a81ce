"""Helpers for tests only: what a frozen or dead holder's silence amounts to, on demand.

Kept out of :class:`~worker.store.Store` so production code cannot call them.
"""

from __future__ import annotations

from sqlalchemy import select, update

from worker.models import Run, Status
from worker.store import Store
from worker.store.engine import db_epoch
from worker.store.tables import run_from_row, runs


def expire_lease(store: Store, run_id: str) -> None:
    """Mark a run's lease expired now (what a frozen holder's silence amounts to)."""
    with store.engine.begin() as conn:
        conn.execute(
            update(runs).where(runs.c.id == run_id).values(lease_expires_at=db_epoch() - 1)
        )


def expired_runs(store: Store, limit: int = 100) -> list[Run]:
    """``running`` runs whose lease has expired on the database clock."""
    query = (
        select(runs)
        .where(runs.c.status == Status.RUNNING.value, runs.c.lease_expires_at < db_epoch())
        .limit(limit)
    )
    with store.engine.connect() as conn:
        return [run_from_row(row) for row in conn.execute(query)]
