"""Beat-scheduled tasks: thin wrappers that build their dependencies and call plain functions."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from scheduler import watchdog
from worker.celery_app import RETENTION, WATCHDOG, app
from worker.publish import publish_resumed
from worker.runtime import get_runtime


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


@app.task(name=RETENTION, ignore_result=True)
def retention() -> dict[str, int]:
    """Delete entries and samples older than ``retention_days``, in small batches."""
    runtime = get_runtime()
    cutoff = datetime.now(UTC) - timedelta(days=runtime.settings.retention_days)
    return runtime.store.delete_older_than(cutoff)
