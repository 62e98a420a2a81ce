"""Telemetry samples and retention: the maintenance half of the store interface."""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Engine, delete, func, insert, select

from worker.store.engine import aware
from worker.store.entries import holds
from worker.store.tables import log_entries, telemetry_samples


class MaintenanceQueries:
    """Samples and retention (mixed into ``Store``)."""

    _reader: Engine

    def _transaction(self) -> contextlib.AbstractContextManager[Connection]:
        raise NotImplementedError

    def append_sample(
        self,
        run_id: str,
        values: dict[str, Any],
        *,
        at: datetime | None = None,
        cap: int = 2000,
        epoch: int | None = None,
    ) -> bool:
        """Add a telemetry point; past ``cap`` every other point is dropped, ends kept.

        With ``epoch`` the point is fenced like a log entry: written only while that lease
        epoch holds the run (a worker cut off past its lease writes nothing when it is back).
        Returns whether it was written.
        """
        with self._transaction() as conn:
            if epoch is not None and not holds(conn, run_id, epoch):
                return False
            self._append_sample(conn, run_id, values, at=at, cap=cap)
        return True

    @staticmethod
    def _append_sample(
        conn: Connection, run_id: str, values: dict[str, Any], *, at: datetime | None, cap: int
    ) -> None:
        """:meth:`append_sample` inside the caller's transaction."""
        conn.execute(
            insert(telemetry_samples).values(
                run_id=run_id, at=at or datetime.now(UTC), values=values
            )
        )
        count = conn.execute(
            select(func.count()).where(telemetry_samples.c.run_id == run_id)
        ).scalar_one()
        if count <= cap:
            return
        ranked = (
            select(
                telemetry_samples.c.id,
                func.row_number()
                .over(order_by=(telemetry_samples.c.at, telemetry_samples.c.id))
                .label("rn"),
            )
            .where(telemetry_samples.c.run_id == run_id)
            .subquery()
        )
        # Drop the even-ranked points: the first and the newest (odd count) stay.
        doomed = select(ranked.c.id).where(ranked.c.rn % 2 == 0, ranked.c.rn < count)
        conn.execute(delete(telemetry_samples).where(telemetry_samples.c.id.in_(doomed)))

    def delete_older_than(self, cutoff: datetime, *, batch: int = 5000) -> dict[str, int]:
        """Delete entries and samples older than ``cutoff``, ``batch`` rows a transaction.

        Small transactions keep locks short: writers never wait behind retention.
        """
        deleted = {"entries": 0, "samples": 0}
        for name, table, column in (
            ("entries", log_entries, log_entries.c.occurred_at),
            ("samples", telemetry_samples, telemetry_samples.c.at),
        ):
            while True:
                doomed = select(table.c.id).where(column < cutoff).order_by(table.c.id).limit(batch)
                with self._transaction() as conn:
                    count = conn.execute(
                        delete(table).where(table.c.id.in_(doomed.scalar_subquery()))
                    ).rowcount
                deleted[name] += count
                if count < batch:
                    break
        return deleted

    def replace_samples(
        self, run_id: str, samples: list[tuple[datetime | None, dict[str, Any]]]
    ) -> None:
        """Replace a run's whole telemetry series (a post-run backfill)."""
        with self._transaction() as conn:
            self._replace_samples(conn, run_id, samples)

    @staticmethod
    def _replace_samples(
        conn: Connection, run_id: str, samples: list[tuple[datetime | None, dict[str, Any]]]
    ) -> None:
        """:meth:`replace_samples` inside the caller's transaction."""
        now = datetime.now(UTC)
        conn.execute(delete(telemetry_samples).where(telemetry_samples.c.run_id == run_id))
        if samples:
            conn.execute(
                insert(telemetry_samples),
                [{"run_id": run_id, "at": at or now, "values": values} for at, values in samples],
            )

    def samples(self, run_id: str) -> list[tuple[datetime, dict[str, Any]]]:
        """A run's telemetry series, oldest first."""
        query = (
            select(telemetry_samples.c.at, telemetry_samples.c["values"])
            .where(telemetry_samples.c.run_id == run_id)
            .order_by(telemetry_samples.c.at, telemetry_samples.c.id)
        )
        with self._reader.connect() as conn:
            return [(aware(row[0]) or datetime.now(UTC), row[1]) for row in conn.execute(query)]
