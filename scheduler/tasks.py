"""Beat-scheduled tasks: thin wrappers that build their dependencies and call plain functions."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

from scheduler import watchdog
from scheduler.ticker import Ticker
from worker import cleanup
from worker.celery_app import RETENTION, SCHEDULE_TICK, WATCHDOG, app
from worker.errors import ConfigError, StoreUnavailable
from worker.pipelines import load_pipelines
from worker.publish import publish_resumed, publish_run
from worker.runtime import get_runtime

#: This process's schedule memory (each pool child keeps its own).
_TICKER = Ticker()
_LAST_ERROR: str | None = None
_STORE_AWAY = False
_log = logging.getLogger("quarry.scheduler")


def _store_away(task: str, exc: StoreUnavailable) -> dict[str, int]:
    """One line per outage for the every-second tasks, not an ERROR with a traceback each."""
    global _STORE_AWAY  # noqa: PLW0603
    if not _STORE_AWAY:
        _log.warning("%s skipped while the store is unavailable (%s)", task, exc)
    _STORE_AWAY = True
    return {}


def _store_back() -> None:
    global _STORE_AWAY  # noqa: PLW0603
    if _STORE_AWAY:
        _log.warning("the store is available again; sweeps and ticks carry on")
    _STORE_AWAY = False


@app.task(name=SCHEDULE_TICK, ignore_result=True)
def schedule_tick() -> dict[str, int]:
    """Create the scheduled runs that are due and publish due retries."""
    global _LAST_ERROR  # noqa: PLW0603 - one line per new error, not one per second
    runtime = get_runtime()
    try:
        pipelines = load_pipelines(runtime.settings.pipelines_file)
        _LAST_ERROR = None
    except ConfigError as exc:
        # Schedules wait for a good file; their clocks are in the store, so nothing is lost.
        if str(exc) != _LAST_ERROR:
            _log.error("schedules paused until the pipelines file is fixed: %s", exc)
        _LAST_ERROR = str(exc)
        pipelines = {}
    try:
        result = _TICKER.tick(
            runtime.store,
            pipelines,
            datetime.now(UTC),
            publish=publish_run,
            publish_resumed=publish_resumed,
        )
    except StoreUnavailable as exc:  # the next tick after the outage creates what is due
        return _store_away("schedule tick", exc)
    _store_back()
    return {"created": len(result.created), "retried": len(result.retried)}


@app.task(name=WATCHDOG, ignore_result=True)
def watchdog_sweep() -> dict[str, int]:
    """One watchdog sweep; returns how many runs each action touched."""
    runtime = get_runtime()
    settings = runtime.settings
    try:
        decisions = watchdog.sweep(
            runtime.store,
            publish_resumed,
            max_attempts=settings.max_attempts,
            republish_after=timedelta(seconds=settings.queued_republish_seconds),
        )
        cleaned = cleanup.clean_up(runtime.store, settings)
    except StoreUnavailable as exc:  # the first sweep after the outage does the work
        return _store_away("watchdog sweep", exc)
    _store_back()
    counts: dict[str, int] = {"cleaned_up": len(cleaned)} if cleaned else {}
    for decision in decisions:
        counts[decision.action.value] = counts.get(decision.action.value, 0) + 1
    return counts


@app.task(name=RETENTION, ignore_result=True)
def retention() -> dict[str, int]:
    """Remove entries and samples older than ``retention_days``; on PostgreSQL, drop whole
    days and create the days ahead (:mod:`worker.store.partitions`)."""
    runtime = get_runtime()
    cutoff = datetime.now(UTC) - timedelta(days=runtime.settings.retention_days)
    created = runtime.store.ensure_partitions()
    removed = runtime.store.delete_older_than(cutoff)
    if created or any(removed.values()):
        _log.info(
            "retention: %d entries and %d samples deleted, %d days of entries and %d of samples "
            "dropped, %d partitions created",
            removed["entries"],
            removed["samples"],
            removed["entry_days"],
            removed["sample_days"],
            len(created),
        )
    return {**removed, "partitions_created": len(created)}
