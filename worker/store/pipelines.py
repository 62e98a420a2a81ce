"""Pipeline state and the runs the scheduler makes: fire times exactly once, due retries,
the runs waiting under ``max_active_runs``. Mixed into ``Store``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine, and_, bindparam, func, select, update
from sqlalchemy.dialects import postgresql, sqlite

from worker.models import TERMINAL, NewEntry, Run, Status, Trigger
from worker.store.engine import aware, utcnow
from worker.store.tables import pipeline_state, queued_run, run_from_row, runs

#: Statuses of a run that has started and not ended; with ``started_at`` set, a
#: ``queued`` run is between attempts (a retry, a recovery) and keeps its slot.
ACTIVE_STATUSES = (Status.RUNNING.value, Status.INTERRUPTED.value, Status.QUEUED.value)


@dataclass(frozen=True, slots=True)
class PipelineState:
    """What the store keeps about a pipeline beside the file: pause and the schedule's clock."""

    pipeline: str
    paused: bool = False
    paused_by: str | None = None
    paused_at: datetime | None = None
    schedule_key: str | None = None
    anchor: datetime | None = None
    last_fire: datetime | None = None


@dataclass(frozen=True, slots=True)
class Fire:
    """One run the scheduler (or a backfill) asks for: its fire time and data interval."""

    fire_time: datetime
    interval_start: datetime
    interval_end: datetime


def active_runs_clause(pipeline: Any, exclude: Any = None) -> Any:
    """Runs of ``pipeline`` that started and have not ended (worker runs; gateways are theirs)."""
    alias = runs.alias("active")
    clause = and_(
        alias.c.pipeline == pipeline,
        alias.c.status.in_(ACTIVE_STATUSES),
        alias.c.started_at.is_not(None),
        alias.c.gateway.is_(None),
    )
    if exclude is not None:
        clause = and_(clause, alias.c.id != exclude)
    return alias, clause


class PipelineQueries:
    """Pipeline state and scheduled runs (mixed into ``Store``)."""

    _reader: Engine
    dialect: str

    if TYPE_CHECKING:

        def _transaction(self) -> contextlib.AbstractContextManager[Connection]: ...

        def _insert_entries(self, conn: Connection, entries: Sequence[NewEntry]) -> None: ...

    # -- state ----------------------------------------------------------------

    def pipeline_states(self, names: Iterable[str] | None = None) -> dict[str, PipelineState]:
        """The stored state of ``names`` (every stored pipeline when None)."""
        query = select(pipeline_state)
        if names is not None:
            query = query.where(pipeline_state.c.pipeline.in_(list(names)))
        with self._reader.connect() as conn:
            return {
                row.pipeline: PipelineState(
                    row.pipeline,
                    bool(row.paused),
                    row.paused_by,
                    aware(row.paused_at),
                    row.schedule_key,
                    aware(row.anchor),
                    aware(row.last_fire),
                )
                for row in conn.execute(query)
            }

    def _upsert_state(self, conn: Connection, pipeline: str, **values: Any) -> None:
        values["updated_at"] = utcnow()
        dialect = postgresql if self.dialect == "postgresql" else sqlite
        stmt = dialect.insert(pipeline_state).values(pipeline=pipeline, **values)
        conn.execute(stmt.on_conflict_do_update(index_elements=["pipeline"], set_=values))

    def start_schedule(self, pipeline: str, key: str, anchor: datetime) -> None:
        """Start (or restart, for a changed schedule) a pipeline's clock at ``anchor``."""
        self.start_schedules([(pipeline, key)], anchor)

    def start_schedules(self, schedules: Sequence[tuple[str, str]], anchor: datetime) -> None:
        """Start the clocks of many ``(pipeline, schedule key)`` at ``anchor``, in one
        transaction (a beat's first tick sees every schedule at once)."""
        if not schedules:
            return
        now = utcnow()
        dialect = postgresql if self.dialect == "postgresql" else sqlite
        stmt = dialect.insert(pipeline_state)
        stmt = stmt.on_conflict_do_update(
            index_elements=["pipeline"],
            set_={
                "schedule_key": stmt.excluded.schedule_key,
                "anchor": stmt.excluded.anchor,
                "last_fire": None,
                "updated_at": stmt.excluded.updated_at,
            },
        )
        rows = [
            {
                "pipeline": name,
                "paused": False,
                "schedule_key": key,
                "anchor": anchor,
                "last_fire": None,
                "updated_at": now,
            }
            for name, key in schedules
        ]
        with self._transaction() as conn:
            conn.execute(stmt, rows)

    def set_paused(self, pipeline: str, paused: bool, by: str | None) -> PipelineState:
        """Pause or resume; resuming restarts the clock now, so a pause fires nothing later."""
        now = utcnow()
        values: dict[str, Any] = {"paused": paused, "paused_by": by if paused else None}
        values["paused_at"] = now if paused else None
        if not paused:
            values["anchor"] = now
        with self._transaction() as conn:
            self._upsert_state(conn, pipeline, **values)
        return self.pipeline_states([pipeline])[pipeline]

    # -- runs the scheduler creates -------------------------------------------

    def create_fired(
        self,
        pipeline: str,
        fires: Sequence[Fire],
        *,
        trigger: Trigger,
        triggered_by: str | None = None,
        params: dict[str, Any] | None = None,
        advance_clock: bool = False,
    ) -> list[Run]:
        """A queued run per fire time not yet taken; returns the runs this call created.

        The unique ``(pipeline, fire_time)`` index decides: a fire time that a second
        beat, a restarted beat or an earlier backfill already created is skipped.
        ``advance_clock`` (the schedule's own fires) moves the pipeline's
        ``last_fire`` in the same transaction.
        """
        return self.create_fired_many(
            [(pipeline, fires)],
            trigger=trigger,
            triggered_by=triggered_by,
            params=params,
            advance_clock=advance_clock,
        )

    def create_fired_many(
        self,
        wanted: Sequence[tuple[str, Sequence[Fire]]],
        *,
        trigger: Trigger,
        triggered_by: str | None = None,
        params: dict[str, Any] | None = None,
        advance_clock: bool = False,
    ) -> list[Run]:
        """:meth:`create_fired` for many pipelines in one transaction and one INSERT (a tick
        with many pipelines due), oldest fire time first."""
        now = utcnow()
        rows = [
            queued_run(
                pipeline,
                params,
                now,
                trigger=trigger.value,
                triggered_by=triggered_by,
                fire_time=fire.fire_time,
                interval_start=fire.interval_start,
                interval_end=fire.interval_end,
            )
            for pipeline, fires in wanted
            for fire in fires
        ]
        if not rows:
            return []
        dialect = postgresql if self.dialect == "postgresql" else sqlite
        # One statement compiled once (cached), sent as batched VALUES by the driver
        # ("insertmanyvalues"): a multi-row values() would be compiled anew every tick.
        stmt = (
            dialect.insert(runs)
            .on_conflict_do_nothing(index_elements=["pipeline", "fire_time"])
            .returning(*runs.c)
        )
        with self._transaction() as conn:
            created = [run_from_row(row) for row in conn.execute(stmt, rows)]
            if advance_clock:
                clocks = [
                    {"name": pipeline, "latest": max(f.fire_time for f in fires), "now": now}
                    for pipeline, fires in wanted
                    if fires
                ]
                conn.execute(
                    update(pipeline_state)
                    .where(
                        pipeline_state.c.pipeline == bindparam("name"),
                        (pipeline_state.c.last_fire.is_(None))
                        | (pipeline_state.c.last_fire < bindparam("latest")),
                    )
                    .values(last_fire=bindparam("latest"), updated_at=bindparam("now")),
                    clocks,
                )
        return sorted(created, key=lambda r: (r.fire_time or now, r.pipeline))

    def claim_due_retries(self, now: datetime, limit: int = 200) -> list[str]:
        """Runs whose retry is due, claimed (``not_before`` cleared) so one caller publishes
        each; oldest due first."""
        query = (
            select(runs.c.id, runs.c.not_before)
            .where(runs.c.not_before.is_not(None), runs.c.not_before <= now)
            .order_by(runs.c.not_before)
            .limit(limit)
        )
        with self._reader.connect() as conn:
            due = conn.execute(query).all()
        claimed: list[str] = []
        for run_id, not_before in due:
            with self._transaction() as conn:
                changed = conn.execute(
                    update(runs)
                    .where(
                        runs.c.id == run_id,
                        runs.c.status == Status.QUEUED.value,
                        runs.c.not_before == not_before,
                    )
                    .values(not_before=None, queued_at=utcnow(), updated_at=utcnow())
                ).rowcount
            if changed == 1:
                claimed.append(run_id)
        return claimed

    # -- max_active_runs ------------------------------------------------------

    def active_counts(self, pipelines: Iterable[str] | None = None) -> dict[str, int]:
        """How many runs of each pipeline have started and not ended."""
        query = (
            select(runs.c.pipeline, func.count())
            .where(
                runs.c.status.in_(ACTIVE_STATUSES),
                runs.c.started_at.is_not(None),
                runs.c.gateway.is_(None),
            )
            .group_by(runs.c.pipeline)
        )
        if pipelines is not None:
            query = query.where(runs.c.pipeline.in_(list(pipelines)))
        with self._reader.connect() as conn:
            return {name: int(count) for name, count in conn.execute(query)}

    def waiting_runs(self, pipeline: str, limit: int) -> list[Run]:
        """Queued runs of ``pipeline`` that have not started, oldest first: the next to wake."""
        query = (
            select(runs)
            .where(
                runs.c.pipeline == pipeline,
                runs.c.status == Status.QUEUED.value,
                runs.c.started_at.is_(None),
                runs.c.gateway.is_(None),
                runs.c.cancel_requested.is_(False),
                runs.c.not_before.is_(None),
            )
            .order_by(runs.c.fire_time.is_(None), runs.c.fire_time, runs.c.created_at, runs.c.id)
            .limit(limit)
        )
        with self._reader.connect() as conn:
            return [run_from_row(row) for row in conn.execute(query)]

    def stranded_waiters(self, ended_before: datetime, limit: int = 100) -> list[Run]:
        """Queued runs still waiting for a run that ended before ``ended_before``, and not
        published again since it ended.

        The run that ended wakes its waiters itself; one that ended without its worker
        (a forced cancel of a stuck child, the watchdog's cancel of a dead one) did not.
        """
        blocker = runs.alias("blocker")
        query = (
            select(runs)
            .join(blocker, blocker.c.id == runs.c.waiting_for)
            .where(
                runs.c.status == Status.QUEUED.value,
                runs.c.waiting_for.is_not(None),
                runs.c.cancel_requested.is_(False),
                runs.c.not_before.is_(None),
                blocker.c.status.in_([s.value for s in TERMINAL]),
                blocker.c.finished_at < ended_before,
                # Not published since: one wake each, the queued re-publish does the rest.
                runs.c.queued_at <= blocker.c.finished_at,
            )
            .order_by(runs.c.queued_at)
            .limit(limit)
        )
        with self._reader.connect() as conn:
            return [run_from_row(row) for row in conn.execute(query)]

    def last_runs(self, pipelines: Iterable[str], per_pipeline: int = 10) -> dict[str, list[Run]]:
        """The newest runs of each pipeline, newest first (a pipeline list's status strip),
        in one query however many pipelines are asked for."""
        names = list(pipelines)
        rank = (
            func.row_number()
            .over(
                partition_by=runs.c.pipeline, order_by=(runs.c.created_at.desc(), runs.c.id.desc())
            )
            .label("rank")
        )
        ranked = select(runs, rank).where(runs.c.pipeline.in_(names)).subquery()
        query = (
            select(*(ranked.c[c.name] for c in runs.c))
            .where(ranked.c.rank <= per_pipeline)
            .order_by(ranked.c.pipeline, ranked.c.rank)
        )
        found: dict[str, list[Run]] = {name: [] for name in names}
        with self._reader.connect() as conn:
            for row in conn.execute(query):
                found[row.pipeline].append(run_from_row(row))
        return found
