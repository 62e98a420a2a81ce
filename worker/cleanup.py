"""What a run ended without its worker must not leave: done by the watchdog's sweep.

A run's worker removes, when the run fails or is cancelled, what its write modes
promise to leave nothing of (an ``append`` run's rows with ``on_failure =
"remove"``, a ``replace`` run's staging table or file set). A run ended over its
worker's head cannot count on that: a forced cancel of a worker stuck in a read
(whose process is then ended), the watchdog's cancel of a dead worker's run, a
run past its ``run_timeout`` whose process is ended. The store marks those runs
(``cleanup_owed``) in the transaction that ends them, and each watchdog sweep
builds the pipeline's destination and calls its ``abort`` for them, once the
worker can no longer write (``cleanup_after_seconds``, 30 s: the fence refuses the
worker's store writes at once, and a worker stuck in a call has its process ended
within seconds, ``worker.heartbeat.LOST_GRACE_SECONDS``). ``abort`` is idempotent, so
a worker that did stop and clean up after all costs nothing more.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

from worker import runlog
from worker.attempt import error_summary
from worker.destinations import build_destination
from worker.destinations.base import RunScope, WriteSpec
from worker.envrefs import resolve_and_register
from worker.models import Event, Level, NewEntry, Run
from worker.pipelines import get_pipeline
from worker.recovery import WATCHDOG_ID
from worker.settings import Settings
from worker.store import Store

_log = logging.getLogger("quarry.watchdog")


def clean_up(store: Store, settings: Settings, *, now: datetime | None = None) -> list[str]:
    """Do the owed write-mode cleanup of runs ended without their worker; returns their ids."""
    now = now or datetime.now(UTC)
    done: list[str] = []
    wait = timedelta(seconds=settings.cleanup_after_seconds)
    for run in store.owed_cleanups(ended_before=now - wait):
        if not store.claim_cleanup(run.id):
            continue  # another sweep took it
        try:
            _abort(run, settings)
        except Exception as exc:
            problem = error_summary(exc)
            store.append_entries([_entry(run, Level.WARNING, Event.RUN_CLEANUP_FAILED, problem)])
            _log.warning("cleanup after %s failed: %s", run.id, problem)
            continue
        store.append_entries([_entry(run, Level.INFO, Event.RUN_CLEANED_UP, None)])
        _log.info("cleaned up after %s (ended without its worker)", run.id)
        done.append(run.id)
    return done


def _abort(run: Run, settings: Settings) -> None:
    pipeline = get_pipeline(settings.pipelines_file, run.pipeline)
    options = resolve_and_register(pipeline.destination.options(), "destination")
    destination = build_destination(pipeline.destination.type, options, settings.files_root)
    log = runlog.get_logger(run_id=run.id, worker_id=WATCHDOG_ID).bind(attempt=run.attempt)
    scope = RunScope(
        pipeline.name,
        run.id,
        run.lease_epoch,
        {r.name: WriteSpec.of(r) for r in pipeline.resources},
    )
    try:
        destination.abort(scope, log)
    finally:
        destination.close()


def _entry(run: Run, level: Level, event: Event, problem: str | None) -> NewEntry:
    message = (
        "Removed what the run's write modes leave nothing of (it ended without its worker)"
        if problem is None
        else f"Could not remove the run's output: {problem}"
    )
    return NewEntry(
        run_id=run.id,
        level=level,
        event=event.value,
        message=message,
        occurred_at=datetime.now(UTC),
        data={} if problem is None else {"error": problem},
        worker_id=WATCHDOG_ID,
        attempt=run.attempt,
    )
