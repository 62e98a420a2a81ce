"""What the console's pages read beyond runs and entries: the dashboard strip's counts and
a run's attempt history (mixed into ``Store``).

Each is a handful of grouped, indexed queries; the console caches the strip for a
few seconds per process, so many open pages cost one read per interval.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, and_, case, func, or_, select

from worker.models import Entry, Event, Status
from worker.store.reads import ENTRY_COLUMNS, entry_from_tuple
from worker.store.tables import log_entries, runs, telemetry_samples

#: The events that start or end an attempt, in the order a run's history tells them.
ATTEMPT_EVENTS = (
    Event.LEASE_ACQUIRED,
    Event.RUN_INTERRUPTED,
    Event.WATCHDOG_RECOVERY,
    Event.WATCHDOG_FAST_RECOVERY,
    Event.RUN_RETRY,
    Event.RUN_COMPLETED,
    Event.RUN_FAILED,
    Event.RUN_CANCELLED,
    Event.WATCHDOG_CANCELLED,
)
_RECOVERIES = (Event.WATCHDOG_RECOVERY.value, Event.WATCHDOG_FAST_RECOVERY.value)


@dataclass(frozen=True, slots=True)
class Dashboard:
    """The strip above the runs table."""

    running: int
    queued: int
    #: Runs that ended so in the last 24 hours.
    succeeded_24h: int
    failed_24h: int
    #: Rows loaded in the last hour, from the telemetry samples of the runs that ran in it.
    rows_last_hour: int
    #: Interruptions (``run_interrupted``) and recoveries (the watchdog's) in the last 24 h.
    interrupted_24h: int
    recovered_24h: int


class ConsoleQueries:
    """The console's reads (mixed into ``Store``)."""

    _reader: Engine

    def dashboard(self, *, gateway: str | None = None, now: datetime | None = None) -> Dashboard:
        """The dashboard strip's counts, limited to ``gateway``'s runs when given."""
        now = now or datetime.now(UTC)
        day, hour = now - timedelta(hours=24), now - timedelta(hours=1)
        scope = [runs.c.gateway == gateway] if gateway is not None else []

        def count_if(*conditions: Any) -> Any:
            return func.coalesce(func.sum(case((and_(*conditions), 1), else_=0)), 0)

        finished_today = runs.c.finished_at >= day
        statuses = select(
            count_if(runs.c.status == Status.RUNNING.value),
            count_if(runs.c.status == Status.QUEUED.value),
            count_if(runs.c.status == Status.SUCCEEDED.value, finished_today),
            count_if(runs.c.status == Status.FAILED.value, finished_today),
        ).where(
            or_(
                runs.c.status.in_([Status.RUNNING.value, Status.QUEUED.value]),
                finished_today,
            ),
            *scope,
        )
        # Rows of the last hour: per run, the newest sample's count minus the oldest's in
        # the window (runs that ran in it only, through the (run_id, at) index).
        rows_of = telemetry_samples.c["values"]["rows_loaded"].as_integer()
        ran = select(runs.c.id).where(
            or_(runs.c.status == Status.RUNNING.value, runs.c.finished_at >= hour), *scope
        )
        per_run = (
            select((func.max(rows_of) - func.min(rows_of)).label("rows"))
            .where(telemetry_samples.c.run_id.in_(ran), telemetry_samples.c.at >= hour)
            .group_by(telemetry_samples.c.run_id)
            .subquery()
        )
        rows = select(func.coalesce(func.sum(per_run.c.rows), 0))
        # Lifecycle events of the last day: an id range first (the occurred_at index),
        # then the (event, id) index within it.
        first_id = (
            select(func.min(log_entries.c.id)).where(log_entries.c.occurred_at >= day)
        ).scalar_subquery()
        events = select(
            count_if(log_entries.c.event == Event.RUN_INTERRUPTED.value),
            count_if(log_entries.c.event.in_(_RECOVERIES)),
        ).where(
            log_entries.c.event.in_([Event.RUN_INTERRUPTED.value, *_RECOVERIES]),
            log_entries.c.id >= first_id,
            log_entries.c.occurred_at >= day,
        )
        if gateway is not None:
            events = events.where(
                log_entries.c.run_id.in_(select(runs.c.id).where(runs.c.gateway == gateway))
            )
        with self._reader.connect() as conn:
            running, queued, succeeded, failed = conn.execute(statuses).one()
            loaded = conn.execute(rows).scalar_one()
            interrupted, recovered = conn.execute(events).one()
        return Dashboard(
            running=int(running),
            queued=int(queued),
            succeeded_24h=int(succeeded),
            failed_24h=int(failed),
            rows_last_hour=max(int(loaded or 0), 0),
            interrupted_24h=int(interrupted),
            recovered_24h=int(recovered),
        )

    def attempt_history(self, run_id: str, limit: int = 500) -> list[Entry]:
        """The entries that start and end a run's attempts, oldest first.

        Read through the (run_id, event, id) index and put in order here: asked to
        order by id, SQLite walks the whole run instead through (run_id, id), already
        in that order; a 200,000-entry run's few lifecycle entries cost 100 ms so.
        """
        query = select(*(log_entries.c[name] for name in ENTRY_COLUMNS)).where(
            log_entries.c.run_id == run_id,
            log_entries.c.event.in_([event.value for event in ATTEMPT_EVENTS]),
        )
        with self._reader.connect() as conn:
            found = [entry_from_tuple(tuple(row)) for row in conn.execute(query)]
        return sorted(found, key=lambda entry: entry.id)[:limit]
