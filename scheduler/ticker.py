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
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

from worker.models import Run, Trigger
from worker.pipelines import Pipeline
from worker.recovery import Publish
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
class Ticker:
    """The tick's memory: when each scheduled pipeline is next due (per process)."""

    _due: dict[str, tuple[str, datetime]] = field(default_factory=dict)

    def tick(
        self,
        store: Store,
        pipelines: Mapping[str, Pipeline],
        now: datetime,
        *,
        publish: Publish,
        publish_resumed: Publish,
    ) -> TickResult:
        """Create and publish the runs due at ``now``; publish the retries that are due."""
        result = TickResult()
        for run_id in store.claim_due_retries(now):
            if _publish(publish_resumed, run_id):
                result.retried.append(run_id)
        scheduled = {name: p for name, p in pipelines.items() if p.schedule is not None}
        for gone in set(self._due) - set(scheduled):
            del self._due[gone]
        due = [
            name
            for name, p in scheduled.items()
            if (known := self._due.get(name)) is None or known[0] != _key(p) or known[1] <= now
        ]
        if not due:
            return result
        states = store.pipeline_states(due)
        result.looked_at = len(due)
        for name in due:
            pipeline = scheduled[name]
            schedule = pipeline.cron
            assert schedule is not None
            key = schedule.key
            state = states.get(name)
            if state is None or state.schedule_key != key or state.anchor is None:
                store.start_schedule(name, key, now)
            elif not state.paused:
                since = max(state.anchor, state.last_fire or state.anchor)
                if pipeline.catchup:
                    fires = schedule.latest_fires(since, now, pipeline.max_catchup)
                else:
                    latest = schedule.latest_at(now)
                    fires = [latest] if latest > since else []
                runs = store.create_fired(
                    name,
                    [Fire(f, schedule.previous_before(f), f) for f in fires],
                    trigger=Trigger.SCHEDULE,
                    advance_clock=True,
                )
                for run in runs:
                    _publish(publish, run.id)
                result.created.extend(runs)
            self._due[name] = (key, schedule.next_after(now))
        return result


def _key(pipeline: Pipeline) -> str:
    schedule = pipeline.cron
    return schedule.key if schedule is not None else ""


def _publish(publish: Publish, run_id: str) -> bool:
    """Publish one run; a broker outage leaves it queued for the watchdog to re-publish."""
    try:
        publish(run_id)
    except Exception as exc:
        _log.warning("could not publish %s (the watchdog will): %s", run_id, describe(exc))
        return False
    return True
