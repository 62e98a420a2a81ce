"""Durable per-pipeline counters behind ``/metrics``. Mixed into ``Store``.

Runs happen in worker processes and ``/metrics`` is served by the API process, so
a run-level counter must outlive both: it is a row of ``pipeline_metrics``, raised
inside the transaction that makes the change it counts (a run started, ended,
recovered, interrupted; a slice's rows committed). A transaction collects its
increments in ``Connection.info`` (:func:`count`, :func:`observe`) and writes them
as one upsert, ``value = value + excluded.value``, as its last statement; on
PostgreSQL, when the transaction inserts entries, the upsert rides on the entries'
INSERT as a CTE instead (:func:`pending_cte`), so a slice's checkpoint costs no
extra round trip. Either way the counter rows are locked after the run row and the
entry locks, and nothing is locked after them, so they add no lock cycle.

Histograms are stored as one row per bucket (not cumulative: the bucket an
observation falls in) and one for the sum; the count is the sum of the buckets.
The scrape reads this table and two grouped queries over ``runs``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, func, select

from worker.models import Status
from worker.store.engine import aware
from worker.store.tables import log_entries, pipeline_metrics, runs

#: Counter names as stored (``quarry_<name>_total`` and friends on the wire).
STARTED = "runs_started"
ENDED = "runs_ended"
RECOVERIES = "run_recoveries"
INTERRUPTIONS = "run_interruptions"
ROWS = "rows_loaded"
BYTES = "bytes_loaded"
DROPPED = "log_entries_dropped"
#: Not a sum: the newest end time of a succeeded run (seconds since the Unix epoch).
LAST_SUCCESS = "last_success_timestamp_seconds"
#: Histograms: ``<name>_bucket`` rows labelled ``le=…`` and a ``<name>_sum`` row.
DURATION = "run_duration_seconds"
QUEUE_WAIT = "queue_wait_seconds"

#: A run's duration, first start to end: seconds to a day.
DURATION_BUCKETS = (1.0, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 28800, 86400)
#: Created (triggered, fired) to its first lease: seconds to a day.
QUEUE_WAIT_BUCKETS = (1.0, 5, 15, 30, 60, 120, 300, 900, 1800, 3600, 7200, 21600, 86400)

#: Key in ``Connection.info`` where a transaction collects its increments.
_PENDING = "quarry.pending_metrics"

Pending = dict[tuple[str, str, str], float]


def count(conn: Connection, pipeline: str, name: str, labels: str = "", value: float = 1) -> None:
    """Raise ``name{labels}`` of ``pipeline`` by ``value`` when this transaction commits."""
    pending: Pending = conn.info.setdefault(_PENDING, {})
    key = (pipeline, name, labels)
    if name == LAST_SUCCESS:
        pending[key] = max(pending.get(key, value), value)
    else:
        pending[key] = pending.get(key, 0.0) + value


def observe(
    conn: Connection,
    pipeline: str,
    name: str,
    value: float,
    *,
    buckets: tuple[float, ...],
    labels: str = "",
) -> None:
    """One observation of histogram ``name``: its bucket and its sum."""
    bound = next((b for b in buckets if value <= b), math.inf)
    le = "le=+Inf" if bound == math.inf else f"le={bound:g}"
    count(conn, pipeline, f"{name}_bucket", f"{labels},{le}" if labels else le)
    count(conn, pipeline, f"{name}_sum", labels, value)


def count_started(conn: Connection, pipeline: str, created_at: Any, started_at: Any) -> None:
    """A run's first lease: started, and how long it waited for it."""
    count(conn, pipeline, STARTED)
    waited = _seconds(created_at, started_at)
    observe(conn, pipeline, QUEUE_WAIT, max(waited or 0.0, 0.0), buckets=QUEUE_WAIT_BUCKETS)


def count_ended(
    conn: Connection, pipeline: str, status: Status, started_at: Any, finished_at: datetime
) -> None:
    """A run's end: by status, its duration since its first start (if it started), and the
    pipeline's last success."""
    labels = f"status={status.value}"
    count(conn, pipeline, ENDED, labels)
    took = _seconds(started_at, finished_at)
    if took is not None:
        observe(conn, pipeline, DURATION, max(took, 0.0), buckets=DURATION_BUCKETS, labels=labels)
    if status is Status.SUCCEEDED:
        count(conn, pipeline, LAST_SUCCESS, "", finished_at.timestamp())


def _seconds(start: Any, end: Any) -> float | None:
    start, end = aware(start), aware(end)
    if start is None or end is None:
        return None
    return float((end - start).total_seconds())


@functools.lru_cache(maxsize=32)
def _upsert_sql(dialect: str, rows: int) -> str:
    """``rows`` counter increments as one INSERT … ON CONFLICT, in the driver's paramstyle."""
    mark, greatest = ("?", "max") if dialect == "sqlite" else ("%s", "greatest")
    values = ", ".join([f"({mark}, {mark}, {mark}, {mark})"] * rows)
    return (
        f"INSERT INTO pipeline_metrics (pipeline, name, labels, value) VALUES {values} "  # noqa: S608 - constant text
        "ON CONFLICT (pipeline, name, labels) DO UPDATE SET value = CASE "
        f"WHEN pipeline_metrics.name = '{LAST_SUCCESS}' "
        f"THEN {greatest}(pipeline_metrics.value, excluded.value) "
        "ELSE pipeline_metrics.value + excluded.value END"
    )


def _take(conn: Connection, dialect: str) -> tuple[str, tuple[Any, ...]] | None:
    pending: Pending | None = conn.info.pop(_PENDING, None)
    if not pending:
        return None
    # Sorted: every transaction locks counter rows in one order.
    rows = sorted(pending.items())
    params = tuple(v for key, value in rows for v in (*key, value))
    return _upsert_sql(dialect, len(rows)), params


def flush(conn: Connection, dialect: str) -> None:
    """Write this transaction's increments (its last statement before the commit)."""
    taken = _take(conn, dialect)
    if taken is not None:
        conn.exec_driver_sql(*taken)


def pending_cte(conn: Connection) -> tuple[str, tuple[Any, ...]]:
    """PostgreSQL: this transaction's increments as a ``WITH`` prefix for the statement about
    to insert entries (its entry locks are held), or nothing."""
    taken = _take(conn, "postgresql")
    if taken is None:
        return "", ()
    sql, params = taken
    return f"WITH quarry_metrics AS ({sql}) ", params


def discard(conn: Connection) -> None:
    """Forget increments of a transaction that did not commit (``info`` outlives it)."""
    conn.info.pop(_PENDING, None)


@dataclass(frozen=True, slots=True)
class MetricsSnapshot:
    """What one scrape reads from the store."""

    #: ``(pipeline, name, labels, value)`` of every stored counter row.
    counters: list[tuple[str, str, str, float]] = field(default_factory=list)
    #: Runs by status, every run in the store.
    runs: dict[str, int] = field(default_factory=dict)
    #: Runs that started and have not ended (running, interrupted, queued between attempts).
    active: dict[str, int] = field(default_factory=dict)
    #: Queued runs that have not started yet.
    queued: dict[str, int] = field(default_factory=dict)
    #: The newest entry id: entries written so far.
    max_entry_id: int = 0

    def pipelines(self, declared: Iterable[str] = ()) -> list[str]:
        """Every pipeline the snapshot or ``declared`` names, sorted."""
        names = {*declared, *self.active, *self.queued, *(row[0] for row in self.counters)}
        return sorted(names)


#: Statuses of runs that have not ended.
_OPEN = (Status.QUEUED.value, Status.RUNNING.value, Status.INTERRUPTED.value)


class MetricQueries:
    """The scrape's reads (mixed into ``Store``); the writes are the functions above."""

    _reader: Engine

    def metrics_snapshot(self) -> MetricsSnapshot:
        """Counters, runs by status, open runs per pipeline and the newest entry id.

        Runs by status is one grouped count over an index on ``status``; open runs
        are found through the same index (ended runs are never read), grouped by
        pipeline; the counters are a few rows per pipeline.
        """
        started = runs.c.started_at.is_not(None).label("started")
        with self._reader.connect() as conn:
            counters = [
                (str(p), str(n), str(lb), float(v))
                for p, n, lb, v in conn.execute(select(pipeline_metrics)).all()
            ]
            by_status = {
                str(status): int(total)
                for status, total in conn.execute(
                    select(runs.c.status, func.count()).group_by(runs.c.status)
                ).all()
            }
            open_runs = conn.execute(
                select(runs.c.pipeline, runs.c.status, started, func.count())
                .where(runs.c.status.in_(_OPEN))
                .group_by(runs.c.pipeline, runs.c.status, started)
            ).all()
            newest = conn.execute(select(func.max(log_entries.c.id))).scalar()
        active: dict[str, int] = {}
        queued: dict[str, int] = {}
        for pipeline, status, has_started, total in open_runs:
            waiting = status == Status.QUEUED.value and not has_started
            into = queued if waiting else active
            into[pipeline] = into.get(pipeline, 0) + int(total)
        return MetricsSnapshot(counters, by_status, active, queued, int(newest or 0))
