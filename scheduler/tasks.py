"""Beat-scheduled tasks: thin wrappers that build their dependencies and call plain functions."""

from __future__ import annotations

from datetime import timedelta

from scheduler import watchdog
from worker.celery_app import WATCHDOG, app
from worker.runtime import get_runtime
from worker.tasks import publish_resumed


@app.task(name=WATCHDOG, ignore_result=True)
def watchdog_sweep() -> dict[str, int]:
    """One watchdog sweep; returns how many runs each action touched."""
    runtime = get_runtime()
    settings = runtime.settings
    decisions = watchdog.sweep(
        runtime.store,
        publish_resumed,
        max_attempts=settings.max_attempts,
        republish_after=timedelta(seconds=settings.queued_republish_seconds),
    )
    counts: dict[str, int] = {}
    for decision in decisions:
        counts[decision.action.value] = counts.get(decision.action.value, 0) + 1
    return counts
