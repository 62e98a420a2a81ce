"""Telemetry samples and retention: the maintenance half of the store interface."""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, TableClause, delete, func, insert, select
from sqlalchemy import column as sql_column
from sqlalchemy import table as sql_table

from worker.errors import StoreUnavailable
from worker.store import partitions
from worker.store.engine import aware
from worker.store.entries import holds
from worker.store.tables import log_entries, telemetry_samples

_log = logging.getLogger(__name__)


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
        """Remove entries and samples older than ``cutoff``; returns what went.

        On PostgreSQL each day older than the cutoff is dropped whole (its
        partition), and only the default partition is deleted from row by row:
        an entry lives between ``cutoff`` and a day past it. On SQLite, and for
        the default partition, rows go ``batch`` a transaction, so writers never
        wait behind retention. A day whose lock is busy stays for the next run.
        """
        removed = {"entries": 0, "samples": 0, "entry_days": 0, "sample_days": 0}
        for rows, whole_days, table, column in (
            ("entries", "entry_days", log_entries, log_entries.c.occurred_at.name),
            ("samples", "sample_days", telemetry_samples, telemetry_samples.c.at.name),
        ):
            target: TableClause = table
            if self._partitioned(table.name):
                removed[whole_days] = self._drop_days(table.name, cutoff)
                # Rows by row only in the default partition, outside every day.
                name = partitions.default_name(table.name)
                target = sql_table(name, sql_column("id"), sql_column(column))
            removed[rows] = self._delete_rows(target, target.c[column], cutoff, batch)
        return removed

    def _delete_rows(self, table: TableClause, column: Any, cutoff: datetime, batch: int) -> int:
        deleted = 0
        while True:
            doomed = select(table.c.id).where(column < cutoff).order_by(table.c.id).limit(batch)
            with self._transaction() as conn:
                count = conn.execute(
                    delete(table).where(table.c.id.in_(doomed.scalar_subquery()))
                ).rowcount
            deleted += count
            if count < batch:
                return deleted

    def _partitioned(self, table: str) -> bool:
        if self._reader.dialect.name != "postgresql":
            return False
        with self._reader.connect() as conn:
            return partitions.is_partitioned(conn, table)

    def _drop_days(self, table: str, cutoff: datetime) -> int:
        """Drop ``table``'s days that end at or before ``cutoff``; returns how many."""
        with self._reader.connect() as conn:
            held = partitions.day_partitions(conn, table)
        dropped = 0
        for day in held:
            if partitions.day_bounds(day)[1] > cutoff:
                break
            name = partitions.day_name(table, day)
            busy = f"retention: {name} is busy; it is dropped next time"
            if self._partition_step(
                functools.partial(partitions.drop_day, table=table, day=day), busy
            ):
                dropped += 1
        return dropped

    def _partition_step(self, step: Callable[[Connection], object], busy: str) -> bool:
        """Run one partition step in a transaction of its own; False (and ``busy`` logged)
        when it gave up waiting for its lock, for the next maintenance to retry."""
        try:
            with self._transaction() as conn:
                step(conn)
        except StoreUnavailable as exc:
            if not partitions.lock_busy(exc):
                raise
            _log.warning(busy)
            return False
        return True

    def ensure_partitions(self, today: date | None = None) -> list[str]:
        """Create the days from yesterday to ``DAYS_AHEAD`` after ``today`` that are missing.

        PostgreSQL only (nothing to do on SQLite). Returns the partitions created.
        """
        today = today or datetime.now(UTC).date()
        created: list[str] = []
        for table in partitions.PARTITIONED:
            if not self._partitioned(table):
                continue
            with self._reader.connect() as conn:
                held = partitions.day_partitions(conn, table)
            wanted = partitions.days(
                today - timedelta(days=1), today + timedelta(days=partitions.DAYS_AHEAD)
            )
            for day in wanted:
                if day in held:
                    continue
                name = partitions.day_name(table, day)
                busy = f"partitions: {table} is busy; {name} is created next time"
                step = functools.partial(partitions.create_day, table=table, day=day)
                if not self._partition_step(step, busy):
                    break
                created.append(name)
        return created

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
