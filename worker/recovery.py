"""Recovery of a run whose worker stopped or died: pure decisions over the run record and
the clocks (:func:`decide`), and the conditional transition that carries one out (:func:`act`).

- A ``running`` run whose lease expired on the database clock lost its worker
  (SIGKILL, OOM, a lost machine, a frozen process): back to ``queued`` with
  ``attempt + 1`` and a fresh wake-up message (``watchdog_recovery``); it
  resumes from its checkpoint. Attempts exhausted, or a cancel was requested:
  it ends ``cancelled`` (``watchdog_cancelled``, the reason in
  ``error_summary``).
- An ``interrupted`` run (SIGTERM, checkpoint saved, lease released) is
  re-queued at once with the same attempt (``watchdog_fast_recovery``). The
  stopping worker calls :func:`fast_recover` itself, so recovery does not
  wait for the next sweep; the sweep is the safety net.
- A ``queued`` run that no worker took for ``queued_republish_seconds`` (the
  broker lost its message: Redis restarted without persistence, FLUSHALL) is
  re-published (``watchdog_recovery``). A duplicate message is a no-op.

Every action is a conditional transition on the state (and epoch) the
decision saw, so when two watchdogs sweep at once exactly one acts on each
stale lease; the loser's transition matches nothing. The timed sweep that
looks at every candidate is ``scheduler/watchdog.py``; this module is shared
by it and by the worker, which never imports the scheduler.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from worker.models import Event, Level, NewEntry, Run, Status
from worker.store import Store

#: The worker id watchdog entries carry.
WATCHDOG_ID = "watchdog"

Publish = Callable[[str], None]


class Action(enum.StrEnum):
    """What the watchdog does with a run."""

    NONE = "none"
    RECOVER = "recover"
    FAST_RECOVER = "fast_recover"
    REPUBLISH = "republish"
    WAKE = "wake"
    GIVE_UP = "give_up"
    CANCEL = "cancel"


@dataclass(frozen=True, slots=True)
class Decision:
    """The watchdog's verdict on one run."""

    run: Run
    action: Action
    reason: str


def is_stale(run: Run, db_now: float) -> bool:
    """Whether a running run's lease has expired at database time ``db_now``."""
    return (
        run.status is Status.RUNNING
        and run.lease_expires_at is not None
        and run.lease_expires_at < db_now
    )


def decide(
    run: Run,
    *,
    db_now: float,
    now: datetime,
    max_attempts: int,
    republish_after: timedelta,
) -> Decision:
    """What to do with ``run``: a pure function of the record and the clocks."""
    if is_stale(run, db_now):
        expired_for = db_now - (run.lease_expires_at or db_now)
        return owner_gone(
            run, f"lease of {run.lease_owner} expired {expired_for:.1f}s ago", max_attempts
        )
    if run.status is Status.INTERRUPTED:
        if run.cancel_requested:
            return Decision(run, Action.CANCEL, "cancel requested while interrupted")
        return Decision(run, Action.FAST_RECOVER, "interrupted by its worker; checkpoint saved")
    if run.status is Status.QUEUED and now - run.queued_at > republish_after:
        waited = (now - run.queued_at).total_seconds()
        return Decision(run, Action.REPUBLISH, f"queued {waited:.0f}s with no worker taking it")
    return Decision(run, Action.NONE, "nothing to do")


def owner_gone(run: Run, gone: str, max_attempts: int) -> Decision:
    """What to do with a running run whose holder is gone (``gone`` says how)."""
    if run.cancel_requested:
        return Decision(run, Action.CANCEL, f"cancel requested and the owner is gone ({gone})")
    # Retries are the pipeline's own policy; max_attempts bounds crashes.
    crashes = run.recoveries + 1
    if crashes >= max_attempts:
        return Decision(
            run, Action.GIVE_UP, f"attempts exhausted ({crashes}/{max_attempts}); {gone}"
        )
    return Decision(run, Action.RECOVER, gone)


def _entry(run: Run, event: Event, message: str, **data: object) -> NewEntry:
    return NewEntry(
        run_id=run.id,
        level=Level.WARNING,
        event=event.value,
        message=message,
        occurred_at=datetime.now(UTC),
        data={"previous_owner": run.lease_owner, "previous_epoch": run.lease_epoch, **data},
        worker_id=WATCHDOG_ID,
        attempt=run.attempt,
    )


def act(
    store: Store,
    decision: Decision,
    publish: Publish,
    *,
    max_attempts: int,
    kind: str = "expired_lease",
) -> bool:
    """Carry out one decision; returns whether this call won the transition.

    ``kind`` is what a recovery of a running run is counted as: ``expired_lease``
    (the watchdog) or ``lost_process`` (:func:`release_lost`).
    """
    run, reason = decision.run, decision.reason
    if decision.action is Action.RECOVER:
        entry = _entry(
            run,
            Event.WATCHDOG_RECOVERY,
            f"Recovered stale run: {reason}; attempt {run.attempt + 1}/{max_attempts}",
            reason=reason,
            next_attempt=run.attempt + 1,
        )
        won = store.transition(
            run.id,
            Status.RUNNING,
            Status.QUEUED,
            [entry],
            expected_epoch=run.lease_epoch,
            bump_attempt=True,
            attempt_reason=f"recovery of attempt {run.attempt} ({reason})",
            recovery=kind,
            interruption="worker_lost",
        )
    elif decision.action is Action.FAST_RECOVER:
        entry = _entry(
            run,
            Event.WATCHDOG_FAST_RECOVERY,
            f"Re-queued interrupted run; it resumes from {_position(run)}",
            reason=reason,
            checkpoint=run.checkpoint.get("position"),
        )
        won = store.transition(
            run.id,
            Status.INTERRUPTED,
            Status.QUEUED,
            [entry],
            expected_epoch=run.lease_epoch,
            recovery="fast",
        )
    elif decision.action in {Action.REPUBLISH, Action.WAKE}:
        message = (
            f"Re-published queued run: {reason} (broker message lost?)"
            if decision.action is Action.REPUBLISH
            else f"Woke waiting run: {reason}"
        )
        entry = _entry(run, Event.WATCHDOG_RECOVERY, message, reason=reason)
        won = store.claim_republish(run.id, run.queued_at, [entry])
    elif decision.action in {Action.GIVE_UP, Action.CANCEL}:
        entry = _entry(
            run, Event.WATCHDOG_CANCELLED, f"Cancelled abandoned run: {reason}", reason=reason
        )
        won = store.transition(
            run.id,
            run.status,
            Status.CANCELLED,
            [entry],
            expected_epoch=run.lease_epoch,
            error_summary=reason,
            recovery="give_up" if decision.action is Action.GIVE_UP else None,
            # A running run here lost its worker (its lease expired).
            interruption="worker_lost" if run.status is Status.RUNNING else None,
        )
        return won
    else:
        return False
    # A run targeted at a gateway has no Celery message: its gateway polls for it.
    if won and run.gateway is None:
        publish(run.id)
    return won


def _position(run: Run) -> str:
    position = run.checkpoint.get("position") or {}
    if position.get("slice"):
        return f"after {position['resource']} slice {position['slice']}"
    if position.get("resource"):
        return f"after {position['resource']}"
    return "the start"


def wake_waiting(store: Store, pipeline: str, limit: int, publish: Publish) -> list[str]:
    """Publish the oldest runs of ``pipeline`` held back by ``max_active_runs``, one per free
    slot: a finishing run wakes the next, so it starts within seconds, not at a sweep."""
    free = limit - store.active_counts([pipeline]).get(pipeline, 0)
    if free <= 0:
        return []
    woken = [run.id for run in store.waiting_runs(pipeline, free)]
    for run_id in woken:
        publish(run_id)
    return woken


def fast_recover(store: Store, run_id: str, publish: Publish, *, max_attempts: int) -> bool:
    """Re-queue one interrupted run now (called by the worker that stopped it)."""
    run = store.get_run(run_id)
    decision = decide(
        run,
        db_now=store.db_time(),
        now=datetime.now(UTC),
        max_attempts=max_attempts,
        republish_after=timedelta.max,
    )
    if decision.action not in {Action.FAST_RECOVER, Action.CANCEL}:
        return False
    return act(store, decision, publish, max_attempts=max_attempts)


def release_lost(
    store: Store,
    run_id: str,
    epoch: int | None,
    how: str,
    publish: Publish,
    *,
    max_attempts: int,
) -> Action:
    """The fast path after a pool process died holding ``run_id`` at lease ``epoch``.

    Called by the worker's main process, which saw the process die: the run is
    re-queued (attempt + 1) at once instead of when its lease expires. Fenced:
    only the epoch the dead process held is released; if the watchdog or
    another worker has moved the run on since, nothing happens. ``epoch`` is
    ``None`` when the process died before taking the lease: a run still queued
    is published again (its message was acked with the process's acceptance).
    The lease expiry stays the path for a dead machine.
    """
    run = store.get_run(run_id)
    if epoch is None:
        if run.status is Status.QUEUED and run.gateway is None:
            publish(run.id)
            return Action.REPUBLISH
        return Action.NONE
    if run.status is not Status.RUNNING or run.lease_epoch != epoch:
        return Action.NONE
    decision = owner_gone(run, f"pool process of {run.lease_owner} {how}", max_attempts)
    won = act(store, decision, publish, max_attempts=max_attempts, kind="lost_process")
    return decision.action if won else Action.NONE
