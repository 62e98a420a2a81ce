"""Operator actions, shared by the CLI and the API: trigger, cancel, backfill, pause."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from worker.errors import IllegalTransition, InvalidInput
from worker.limits import check_json
from worker.models import Event, Level, NewEntry, Run, Status, Trigger
from worker.pipelines import Pipeline, get_pipeline, load_pipelines
from worker.scrub import describe, scrubber
from worker.settings import Settings
from worker.sources import check_params
from worker.store import Store
from worker.store.pipelines import Fire, PipelineState

#: The worker id of entries written by operator actions.
OPERATOR_ID = "operator"


def trigger(
    store: Store,
    settings: Settings,
    publish: Callable[[str], None],
    pipeline: str,
    params: dict[str, Any],
    *,
    gateway: str | None = None,
    triggered_by: str | None = None,
) -> Run:
    """Create a queued run and publish its wake-up (a failed publish leaves it queued, with a
    ``run_unpublished`` warning: the watchdog publishes it once the broker is back).

    The pipeline is validated first, and the params against its source's options, so a
    broken file or a bad ``--param`` fails here, not in a worker.
    ``params`` are bounded (:func:`worker.limits.check_json`) and scrubbed before
    they are stored: a password passed as a parameter is never kept or shown.
    A run targeted at a gateway is not published: that gateway polls for it.
    A scheduled pipeline's manual run covers the latest complete data interval.
    """
    check_json(params, "params")
    declared = get_pipeline(settings.pipelines_file, pipeline)
    if gateway is None:  # a gateway's runner reads its params itself
        check_params(declared.source.type, declared.source.options(), params)
    interval = None
    if declared.cron is not None:
        latest = declared.cron.latest_at(datetime.now(UTC))
        interval = (declared.cron.previous_before(latest), latest)
    run = store.create_run(
        pipeline,
        scrubber.data(params),
        gateway=gateway,
        triggered_by=triggered_by,
        interval=interval,
    )
    if gateway is not None:
        return run
    try:
        publish(run.id)
    except Exception as exc:
        # Stored and queued: the watchdog publishes it once the broker is back (a queued run
        # no worker took for queued_republish_seconds). Nothing is lost in a broker outage.
        store.append_entries([_unpublished(run, exc, settings.queued_republish_seconds)])
    return run


def _unpublished(run: Run, exc: BaseException, republish_seconds: float) -> NewEntry:
    reason = describe(exc)
    return NewEntry(
        run_id=run.id,
        level=Level.WARNING,
        event=Event.RUN_UNPUBLISHED.value,
        message=(
            f"The broker is unreachable ({reason}): the run is stored and queued, and is "
            f"published once the broker is back (within {republish_seconds:.0f}s of it)"
        ),
        occurred_at=datetime.now(UTC),
        data={"error": reason},
        worker_id=OPERATOR_ID,
        attempt=run.attempt,
    )


def cancel(store: Store, run_id: str, *, force: bool = False, by: str | None = None) -> Run:
    """Cancel a run: at once when no worker holds it, at its next heartbeat when one does.

    A queued or interrupted run ends ``cancelled`` now, with a ``run_cancelled``
    entry. A running run is flagged; its worker sees the flag when it renews
    its lease, stops at a safe point and logs ``run_cancelled``; if that worker
    is dead, the watchdog finishes the cancellation when the lease expires.

    ``force`` ends a running run ``cancelled`` now, without waiting for a safe point:
    the epoch moves on, so its worker's next write is refused (the fence), and its
    worker stops at its next check or, stuck in a call that never returns, has its
    process ended (:mod:`worker.heartbeat`). Use it for a run that does not stop.
    """
    run = store.get_run(run_id)
    if run.status.terminal:
        msg = f"run {run_id} already ended ({run.status.value})"
        raise IllegalTransition(msg)
    who = f" by {by}" if by else " by an operator"
    if run.status is Status.RUNNING and force:
        entry = _operator_entry(
            run,
            f"Run cancelled by force{who}: its worker's writes are refused from now on",
            previous_status=run.status.value,
            previous_owner=run.lease_owner,
            forced=True,
        )
        if store.transition(
            run.id,
            Status.RUNNING,
            Status.CANCELLED,
            [entry],
            expected_epoch=run.lease_epoch,
            error_summary=f"cancelled by force{who}",
        ):
            return store.get_run(run_id)
        return cancel(store, run_id, force=force, by=by)  # it moved on: look again
    if run.status in {Status.QUEUED, Status.INTERRUPTED}:
        entry = _operator_entry(
            run,
            f"Run cancelled{who} while {run.status.value}",
            previous_status=run.status.value,
        )
        if store.transition(
            run.id,
            run.status,
            Status.CANCELLED,
            [entry],
            error_summary=f"cancelled{who}",
        ):
            return store.get_run(run_id)
        # It moved on (a worker took it) in the meantime: flag it instead.
    store.request_cancel(run_id)
    return store.get_run(run_id)


def _operator_entry(run: Run, message: str, **data: Any) -> NewEntry:
    return NewEntry(
        run_id=run.id,
        level=Level.WARNING,
        event=Event.RUN_CANCELLED.value,
        message=message,
        occurred_at=datetime.now(UTC),
        data=data,
        worker_id=OPERATOR_ID,
        attempt=run.attempt,
    )


@dataclass(frozen=True, slots=True)
class Backfill:
    """What a backfill asked for and what it created."""

    intervals: int
    created: list[Run]

    @property
    def existing(self) -> int:
        """Intervals that already had a run (a repeated backfill, or the schedule's own)."""
        return self.intervals - len(self.created)

    def as_dict(self) -> dict[str, Any]:
        """The documented JSON shape (API, ``--json``)."""
        return {
            "intervals": self.intervals,
            "created": len(self.created),
            "existing": self.existing,
            "runs": [r.as_dict() for r in self.created],
        }


def backfill(
    store: Store,
    settings: Settings,
    publish: Callable[[str], None],
    pipeline: str,
    *,
    start: datetime,
    end: datetime,
    triggered_by: str | None = None,
) -> Backfill:
    """One run per data interval of the pipeline's schedule within ``[start, end]``.

    An interval is in the range when it starts at or after ``start`` and ends at or
    before ``end``. Each run carries its interval's fire time, under the same
    exactly-once key as the schedule's runs: a repeated backfill adds nothing.
    Nothing is created when the range is reversed, holds no interval, or holds more
    than ``max_backfill_runs``.
    """
    declared = get_pipeline(settings.pipelines_file, pipeline)
    schedule = declared.cron
    if schedule is None:
        msg = f"pipeline {pipeline!r} has no schedule: a backfill needs one to cut intervals"
        raise InvalidInput(msg)
    start, end = _utc(start), _utc(end)
    if end <= start:
        msg = f"to ({end.isoformat()}) must be after from ({start.isoformat()})"
        raise InvalidInput(msg)
    fires: list[Fire] = []
    try:
        for fire in schedule.fires(start, end):
            interval = schedule.interval(fire)
            if interval.start < start:
                continue
            if len(fires) == settings.max_backfill_runs:
                msg = (
                    f"from/to: the range holds more than {settings.max_backfill_runs:,} "
                    "intervals of the schedule (QUARRY_MAX_BACKFILL_RUNS); split it"
                )
                raise InvalidInput(msg)
            fires.append(Fire(fire, interval.start, interval.end))
    except (OverflowError, ValueError) as exc:  # a range at the calendar's edge
        msg = f"from/to: outside the dates a schedule can reach ({exc})"
        raise InvalidInput(msg) from None
    if not fires:
        msg = (
            f"from/to: no complete interval of {pipeline!r}'s schedule "
            f"({schedule.expression}, {schedule.timezone}) lies within the range"
        )
        raise InvalidInput(msg)
    created = store.create_fired(
        pipeline, fires, trigger=Trigger.BACKFILL, triggered_by=triggered_by
    )
    for run in created:
        try:
            publish(run.id)
        except Exception:  # stored and queued: the watchdog re-publishes it
            break
    return Backfill(len(fires), created)


def _utc(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    try:
        return moment.astimezone(UTC)
    except OverflowError:
        msg = f"{moment.isoformat()} is outside the dates a schedule can reach"
        raise InvalidInput(msg) from None


def set_paused(
    store: Store, settings: Settings, pipeline: str, paused: bool, *, by: str | None = None
) -> PipelineState:
    """Pause (no scheduled run fires) or resume (the schedule's clock restarts now)."""
    get_pipeline(settings.pipelines_file, pipeline)  # an unknown name is an error
    return store.set_paused(pipeline, paused, by)


@dataclass(frozen=True, slots=True)
class PipelineView:
    """A pipeline as operators list it: the file's declaration and the store's state."""

    pipeline: Pipeline
    state: PipelineState
    next_fire: datetime | None
    active_runs: int
    last_runs: list[Run]

    def as_dict(self) -> dict[str, Any]:
        """The documented JSON shape (API, ``--json``)."""
        p = self.pipeline
        last = self.last_runs[0] if self.last_runs else None
        return {
            "name": p.name,
            "description": p.description,
            "source": p.source.type,
            "destination": p.destination.type,
            "resources": [
                {"name": r.name, "write_mode": r.write_mode.value, "sliced": r.slices is not None}
                for r in p.resources
            ],
            "schedule": p.schedule,
            "timezone": p.timezone if p.schedule else None,
            "catchup": p.catchup,
            "next_fire": None if self.next_fire is None else self.next_fire.isoformat(),
            "paused": self.state.paused,
            "paused_by": self.state.paused_by,
            "max_active_runs": p.max_active_runs,
            "active_runs": self.active_runs,
            "retries": p.retries,
            "last_status": None if last is None else last.status.value,
            "last_run": None if last is None else last.id,
            "recent_statuses": [r.status.value for r in self.last_runs],
        }


def pipelines_overview(
    store: Store, settings: Settings, name: str | None = None
) -> list[PipelineView]:
    """Every pipeline of the file (or one) with its schedule, pause, active and last runs."""
    declared = load_pipelines(settings.pipelines_file)
    if name is not None:
        declared = {name: get_pipeline(settings.pipelines_file, name)}
    states = store.pipeline_states(declared)
    active = store.active_counts(declared)
    recent = store.last_runs(declared)
    now = datetime.now(UTC)
    views = []
    for key, pipeline in sorted(declared.items()):
        state = states.get(key, PipelineState(key))
        upcoming = None
        if pipeline.cron is not None and not state.paused:
            upcoming = pipeline.cron.next_after(now)
        views.append(PipelineView(pipeline, state, upcoming, active.get(key, 0), recent[key]))
    return views
