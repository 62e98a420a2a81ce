"""The watchdog: pure decisions over run records, and a thin sweep that acts on them.

A ``running`` run whose lease expired on the database clock lost its worker
(SIGKILL, OOM, a lost machine, a frozen process): it goes back to ``queued``
with ``attempt + 1`` and a fresh wake-up message, and resumes from its
checkpoint. The transition is conditional on the stale epoch, so when two
watchdogs sweep at once exactly one recovers each stale lease.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from worker.models import Event, Level, NewEntry, Run, Status
from worker.store import Store

#: The worker id watchdog entries carry.
WATCHDOG_ID = "watchdog"


class Action(enum.StrEnum):
    """What the watchdog does with a run."""

    NONE = "none"
    RECOVER = "recover"
    GIVE_UP = "give_up"


@dataclass(frozen=True, slots=True)
class Decision:
    """The watchdog's verdict on one run."""

    run: Run
    action: Action
    reason: str


def is_stale(run: Run, now: float) -> bool:
    """Whether a running run's lease has expired at database time ``now``."""
    return (
        run.status is Status.RUNNING
        and run.lease_expires_at is not None
        and run.lease_expires_at < now
    )


def decide(run: Run, now: float, *, max_attempts: int) -> Decision:
    """What to do with ``run`` at database time ``now``."""
    if not is_stale(run, now):
        return Decision(run, Action.NONE, "lease is live")
    expired_for = now - (run.lease_expires_at or now)
    if run.attempt >= max_attempts:
        return Decision(
            run,
            Action.GIVE_UP,
            f"attempts exhausted ({run.attempt}/{max_attempts}); lease of {run.lease_owner} "
            f"expired {expired_for:.1f}s ago",
        )
    return Decision(
        run,
        Action.RECOVER,
        f"lease of {run.lease_owner} expired {expired_for:.1f}s ago",
    )


def _entry(run: Run, event: Event, level: Level, message: str, **data: object) -> NewEntry:
    return NewEntry(
        run_id=run.id,
        level=level,
        event=event.value,
        message=message,
        occurred_at=datetime.now(UTC),
        data={"previous_owner": run.lease_owner, "previous_epoch": run.lease_epoch, **data},
        worker_id=WATCHDOG_ID,
        attempt=run.attempt,
    )


def sweep(store: Store, publish: Callable[[str], None], *, max_attempts: int) -> list[Decision]:
    """Recover or give up every run with an expired lease; returns what was done."""
    now = store.db_time()
    done: list[Decision] = []
    for run in store.expired_runs():
        decision = decide(run, now, max_attempts=max_attempts)
        if decision.action is Action.RECOVER:
            entry = _entry(
                run,
                Event.WATCHDOG_RECOVERY,
                Level.WARNING,
                f"Recovered stale run: {decision.reason}; attempt {run.attempt + 1}/{max_attempts}",
                reason=decision.reason,
                next_attempt=run.attempt + 1,
            )
            won = store.transition(
                run.id,
                Status.RUNNING,
                Status.QUEUED,
                [entry],
                expected_epoch=run.lease_epoch,
                bump_attempt=True,
            )
            if won:
                publish(run.id)
                done.append(decision)
        elif decision.action is Action.GIVE_UP:
            entry = _entry(
                run,
                Event.WATCHDOG_CANCELLED,
                Level.WARNING,
                f"Cancelled abandoned run: {decision.reason}",
                reason=decision.reason,
            )
            if store.transition(
                run.id,
                Status.RUNNING,
                Status.CANCELLED,
                [entry],
                expected_epoch=run.lease_epoch,
                error_summary=decision.reason,
            ):
                done.append(decision)
    return done
