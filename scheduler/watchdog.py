"""The watchdog's sweep: every beat-scheduled tick, look at each candidate run once and act.

The decisions and the transitions are :mod:`worker.recovery`'s (pure over the
record and the clocks); this is the timed I/O around them.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

from worker.recovery import Action, Decision, Publish, act, decide
from worker.store import Store

_log = logging.getLogger("quarry.watchdog")

#: How long a run may have ended before the watchdog wakes the runs still waiting for it
#: (its worker wakes them at once; this covers a worker that could not).
WAKE_GRACE = timedelta(seconds=5)
#: A graceful stop's re-queue is routine; every other action means something went wrong.
_ROUTINE = frozenset({Action.FAST_RECOVER})


def sweep(
    store: Store,
    publish: Publish,
    *,
    max_attempts: int,
    republish_after: timedelta = timedelta(seconds=60),
) -> list[Decision]:
    """Look at every candidate run once and act; returns the decisions this sweep won."""
    now = datetime.now(UTC)
    db_now = store.db_time()
    won: list[Decision] = []
    candidates = store.watchdog_candidates(queued_before=now - republish_after)
    for run in candidates:
        decision = decide(
            run, db_now=db_now, now=now, max_attempts=max_attempts, republish_after=republish_after
        )
        if decision.action is not Action.NONE and act(
            store, decision, publish, max_attempts=max_attempts
        ):
            won.append(decision)
            log_action(decision)
    # Runs waiting under max_active_runs for a run that ended without waking them.
    for run in store.stranded_waiters(ended_before=now - WAKE_GRACE):
        decision = Decision(run, Action.WAKE, f"{run.waiting_for}, which it waited for, ended")
        if act(store, decision, publish, max_attempts=max_attempts):
            won.append(decision)
            log_action(decision)
    _log.debug("watchdog sweep: %d candidates, %d acted on", len(candidates), len(won))
    return won


def log_action(decision: Decision) -> None:
    """One line for one action this sweep won: the action, the run and why."""
    level = logging.INFO if decision.action in _ROUTINE else logging.WARNING
    run, reason = decision.run, decision.reason
    if decision.action is Action.RECOVER:
        reason += f"; attempt {run.attempt + 1} next"
    _log.log(level, "watchdog %s %s: %s", decision.action.value, run.id, reason)
