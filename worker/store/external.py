"""The external runners' writes: one PATCH of the runs contract as one transaction.

Mixed into :class:`~worker.store.store.Store`. Everything a PATCH asks for
(status, log lines, a replaced log, telemetry, error summary, finish time)
lands together or not at all: a refused fence, an illegal transition or a
failing insert rolls back every part of it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, delete, select, update

from worker.errors import IllegalTransition
from worker.models import TERMINAL, Lease, NewEntry, Status
from worker.store import metrics
from worker.store.engine import db_epoch, utcnow
from worker.store.tables import log_entries, runs


@dataclass(slots=True)
class ExternalChange:
    """What one PATCH changes, already validated and scrubbed."""

    #: A terminal (or interrupted) status that ends the holder's tenure; None keeps it running.
    status: Status | None = None
    #: Entries appended after everything else (the ending entry last).
    entries: list[NewEntry] = field(default_factory=list)
    #: The run's whole log, replaced.
    log: list[NewEntry] | None = None
    #: The merged telemetry summary.
    summary: dict[str, Any] | None = None
    #: The whole telemetry series, replaced.
    samples: list[tuple[datetime | None, dict[str, Any]]] | None = None
    #: One appended telemetry point.
    sample: tuple[datetime | None, dict[str, Any]] | None = None
    error_summary: str | None = None
    finished_at: datetime | None = None


def _run_values(change: ExternalChange, *, held: bool, ttl_seconds: float) -> dict[str, Any]:
    """The run row's new values: a holder's renewal or end of tenure, or an ended run's backfill."""
    now = utcnow()
    values: dict[str, Any] = {"updated_at": now}
    if change.summary is not None:
        values["telemetry_summary"] = change.summary
    if change.error_summary is not None:
        values["error_summary"] = change.error_summary
    if not held:
        if change.finished_at is not None:
            values["finished_at"] = change.finished_at
    elif change.status is None:
        values["lease_expires_at"] = db_epoch() + ttl_seconds
        values["heartbeat_at"] = now
    else:
        values.update(status=change.status.value, lease_owner=None, lease_expires_at=None)
        if change.status in TERMINAL:
            values["finished_at"] = change.finished_at or now
    return values


#: Summary counters added to the pipeline's when a runner's run ends (either spelling).
_LOADED = {
    metrics.ROWS: ("rows_loaded", "rowsLoaded"),
    metrics.BYTES: ("bytes_loaded", "bytesLoaded"),
}


def _count_end(
    conn: Connection, run_id: str, row: Any, change: ExternalChange, finished_at: Any
) -> None:
    """The pipeline's counters for a runner's end of tenure: an interruption, or the run's end
    with the rows and bytes its final telemetry summary reports (a runner's slices are not
    checkpointed here, so they are counted once, when the run ends)."""
    assert change.status is not None
    if change.status not in TERMINAL:
        metrics.count(conn, row.pipeline, metrics.INTERRUPTIONS, "kind=external")
        return
    metrics.count_ended(conn, row.pipeline, change.status, row.started_at, finished_at)
    summary = change.summary
    if summary is None:
        stored = select(runs.c.telemetry_summary).where(runs.c.id == run_id)
        summary = conn.execute(stored).scalar_one_or_none() or {}
    for name, keys in _LOADED.items():
        for key in keys:
            value = summary.get(key)
            if type(value) is int and value > 0:
                metrics.count(conn, row.pipeline, name, "", value)
                break


class ExternalWrites:
    """The PATCH contract's writes (mixed into ``Store``)."""

    if TYPE_CHECKING:

        def _transaction(self) -> contextlib.AbstractContextManager[Connection]: ...

        def _fence(self, conn: Connection, lease: Lease, values: dict[str, Any]) -> Any: ...

        def _insert_entries(self, conn: Connection, entries: Sequence[NewEntry]) -> None: ...

        def _ended(self, run_id: str) -> None: ...

        @staticmethod
        def _append_sample(
            conn: Connection, run_id: str, values: dict[str, Any], *, at: datetime | None, cap: int
        ) -> None: ...

        @staticmethod
        def _replace_samples(
            conn: Connection, run_id: str, samples: list[tuple[datetime | None, dict[str, Any]]]
        ) -> None: ...

    def write_external(
        self,
        run_id: str,
        lease: Lease | None,
        change: ExternalChange,
        *,
        ttl_seconds: float,
        sample_cap: int,
    ) -> None:
        """Apply ``change`` in one transaction.

        With ``lease`` (a running run) the write is fenced on its epoch and renews
        it, or ends the tenure when ``change.status`` is set; raises ``LeaseLost``.
        Without one the run must have ended (backfills): raises
        :class:`IllegalTransition` when it has not.
        """
        values = _run_values(change, held=lease is not None, ttl_seconds=ttl_seconds)
        with self._transaction() as conn:
            if lease is not None:
                row = self._fence(conn, lease, values)
                if change.status is not None:
                    _count_end(conn, run_id, row, change, values.get("finished_at"))
            else:
                terminal = [status.value for status in TERMINAL]
                ended = conn.execute(
                    update(runs)
                    .where(runs.c.id == run_id, runs.c.status.in_(terminal))
                    .values(**values)
                ).rowcount
                if not ended:
                    msg = f"run {run_id} is not running under this lease and has not ended"
                    raise IllegalTransition(msg)
            if change.log is not None:
                conn.execute(delete(log_entries).where(log_entries.c.run_id == run_id))
                self._insert_entries(conn, change.log)
            if change.samples is not None:
                self._replace_samples(conn, run_id, change.samples)
            if change.sample is not None:
                at, point = change.sample
                self._append_sample(conn, run_id, point, at=at, cap=sample_cap)
            self._insert_entries(conn, change.entries)
        if change.status in TERMINAL:
            self._ended(run_id)
