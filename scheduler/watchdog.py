"""The watchdog's sweep: every beat-scheduled tick, look at each candidate run once and act.

The decisions and the transitions are :mod:`worker.recovery`'s (pure over the
record and the clocks); this is the timed I/O around them.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from worker.recovery import Action, Decision, Publish, act, decide
from worker.store import Store


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
    for run in store.watchdog_candidates(queued_before=now - republish_after):
        decision = decide(
            run, db_now=db_now, now=now, max_attempts=max_attempts, republish_after=republish_after
        )
        if decision.action is not Action.NONE and act(
            store, decision, publish, max_attempts=max_attempts
        ):
            won.append(decision)
    return won
