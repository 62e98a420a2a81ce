"""The schedule tick: every beat-scheduled tick, create the runs that are due, exactly once.

For each scheduled pipeline the tick knows (in memory, per process) when it is
next due, so a tick with nothing due costs no query, whatever the number of
pipelines. When one is due, the store says where its clock stands (the anchor
set when the schedule was first seen or resumed, the last fire time, pause),
and the tick asks for the due fire times:

- ``catchup = false``: the latest fire time since the clock, if any (one run,
  however long beat was down);
- ``catchup = true``: every fire time since the clock, oldest first, at most
  the newest ``max_catchup``.

Each becomes a queued run carrying its fire time and data interval; the store's
unique ``(pipeline, fire_time)`` index refuses a second one, so two beats, a
restarted beat or a slow tick never create a duplicate. A new schedule starts
its clock at the tick that first sees it; a changed one restarts it.

The tick also publishes the runs whose retry is due (``not_before`` passed).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime

from worker.models import Run, Trigger
from worker.pipelines import Pipeline
from worker.recovery import Publish
from worker.schedules import Schedule
from worker.scrub import describe
from worker.store import Store
from worker.store.pipelines import Fire

_log = logging.getLogger("quarry.scheduler")


@dataclass
class TickResult:
    """What one tick did."""

    created: list[Run] = field(default_factory=list)
    retried: list[str] = field(default_factory=list)
    #: Pipelines whose state was read (due, or seen for the first time).
    looked_at: int = 0


@dataclass
class _Clock:
    """One pipeline's next fire time, as this process last computed it."""

    key: str
    #: The next fire time, and the one before it (where its data interval starts).
    due: datetime
    previous: datetime
    #: The schedule's fire times after ``due``, walked forward one at a time.
    after: Iterator[datetime]

    @classmethod
    def start(cls, schedule: Schedule, now: datetime) -> _Clock:
        after = schedule.following(now)
        due = next(after)
        return cls(schedule.key, due, schedule.previous_before(due), after)


@dataclass
class Ticker:
    """The tick's memory: when each scheduled pipeline is next due (per process)."""

    _clocks: dict[str, _Clock] = field(default_factory=dict)

    def tick(
        self,
        store: Store,
        pipelines: Mapping[str, Pipeline],
        now: datetime,
        *,
        publish: Publish,
        publish_resumed: Publish,
    ) -> TickResult:
        """Create and publish the runs due at ``now``; publish the retries that are due.

        Every due pipeline's runs are created in one transaction, and its next fire
        time comes from a croniter walked forward: a tick's cost grows with the
        pipelines due, and a tick with none due costs one indexed query (due retries).
        """
        result = TickResult()
        for run_id in store.claim_due_retries(now):
            if _publish(publish_resumed, run_id):
                _log.info("schedule tick: retry of %s is due; published", run_id)
                result.retried.append(run_id)
        scheduled = {name: p for name, p in pipelines.items() if p.schedule is not None}
        for gone in set(self._clocks) - set(scheduled):
            del self._clocks[gone]
        due = [
            name
            for name, p in scheduled.items()
            if (clock := self._clocks.get(name)) is None or clock.key != _key(p) or clock.due <= now
        ]
        if not due:
            return result
        states = store.pipeline_states(due)
        result.looked_at = len(due)
        starting: list[tuple[str, str]] = []
        wanted: list[tuple[str, list[Fire]]] = []
        for name in due:
            pipeline = scheduled[name]
            schedule = pipeline.cron
            assert schedule is not None
            state = states.get(name)
            clock = self._clocks.get(name)
            if clock is not None and clock.key != schedule.key:
                clock = None
            if state is None or state.schedule_key != schedule.key or state.anchor is None:
                starting.append((name, schedule.key))
                self._clocks[name] = _Clock.start(schedule, now)
                continue
            since = max(state.anchor, state.last_fire or state.anchor)
            fires, self._clocks[name] = _due_fires(pipeline, schedule, clock, since, now)
            if not state.paused and fires:
                wanted.append((name, fires))
        store.start_schedules(starting, now)
        created = store.create_fired_many(wanted, trigger=Trigger.SCHEDULE, advance_clock=True)
        for run in created:
            _log.info("schedule tick: created %s of %s for %s", run.id, run.pipeline, _fire(run))
            _publish(publish, run.id)
        result.created.extend(created)
        return result


def _due_fires(
    pipeline: Pipeline, schedule: Schedule, clock: _Clock | None, since: datetime, now: datetime
) -> tuple[list[Fire], _Clock]:
    """The runs due for one pipeline at ``now``, and its clock moved past ``now``.

    The usual case, one fire time passed since the last tick, walks the clock one
    step; anything else (a fresh process, a beat that was down, a slow tick) is
    computed from the schedule: the latest fire time, or with ``catchup`` the newest
    ``max_catchup`` of them.
    """
    if clock is not None and clock.due <= now:
        following = next(clock.after)
        if following > now:
            passed = [clock.due] if clock.due > since else []
            moved = _Clock(clock.key, following, clock.due, clock.after)
            return [Fire(f, clock.previous, f) for f in passed], moved
    if pipeline.catchup:
        times = schedule.latest_fires(since, now, pipeline.max_catchup)
    else:
        latest = schedule.latest_at(now)
        times = [latest] if latest > since else []
    fires = [Fire(f, schedule.previous_before(f), f) for f in times]
    return fires, _Clock.start(schedule, now)


def _key(pipeline: Pipeline) -> str:
    schedule = pipeline.cron
    return schedule.key if schedule is not None else ""


def _fire(run: Run) -> str:
    return f"fire time {run.fire_time.isoformat()}" if run.fire_time else "its schedule"


def _publish(publish: Publish, run_id: str) -> bool:
    """Publish one run; a broker outage leaves it queued for the watchdog to re-publish."""
    try:
        publish(run_id)
    except Exception as exc:
        _log.warning("could not publish %s (the watchdog will): %s", run_id, describe(exc))
        return False
    return True
