"""Operator actions on runs, shared by the CLI and the API: trigger and cancel."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from worker.errors import IllegalTransition, QuarryError
from worker.limits import check_json
from worker.models import Event, Level, NewEntry, Run, Status
from worker.pipelines import get_pipeline
from worker.scrub import scrubber
from worker.settings import Settings
from worker.sources import check_params
from worker.store import Store

#: The worker id of entries written by operator actions.
OPERATOR_ID = "operator"


def trigger(
    store: Store,
    settings: Settings,
    publish: Callable[[str], None],
    pipeline: str,
    params: dict[str, Any],
    *,
    gateway: str | None = None,
) -> Run:
    """Create a queued run and publish its wake-up; a failed publish cancels the run.

    The pipeline is validated first, and the params against its source's options, so a
    broken file or a bad ``--param`` fails here, not in a worker.
    ``params`` are bounded (:func:`worker.limits.check_json`) and scrubbed before
    they are stored: a password passed as a parameter is never kept or shown.
    A run targeted at a gateway is not published: that gateway polls for it.
    """
    check_json(params, "params")
    declared = get_pipeline(settings.pipelines_file, pipeline)
    if gateway is None:  # a gateway's runner reads its params itself
        check_params(declared.source.type, declared.source.options(), params)
    run = store.create_run(pipeline, scrubber.data(params), gateway=gateway)
    if gateway is not None:
        return run
    try:
        publish(run.id)
    except Exception as exc:
        store.transition(
            run.id,
            Status.QUEUED,
            Status.CANCELLED,
            error_summary=f"broker unreachable: {type(exc).__name__}",
        )
        msg = f"could not publish run {run.id}: broker unreachable ({scrubber.text(str(exc))})"
        raise QuarryError(msg) from None
    return run


def cancel(store: Store, run_id: str) -> Run:
    """Cancel a run: at once when no worker holds it, at its next heartbeat when one does.

    A queued or interrupted run ends ``cancelled`` now, with a ``run_cancelled``
    entry. A running run is flagged; its worker sees the flag when it renews
    its lease, stops at a safe point and logs ``run_cancelled``; if that worker
    is dead, the watchdog finishes the cancellation when the lease expires.
    """
    run = store.get_run(run_id)
    if run.status.terminal:
        msg = f"run {run_id} already ended ({run.status.value})"
        raise IllegalTransition(msg)
    if run.status in {Status.QUEUED, Status.INTERRUPTED}:
        entry = NewEntry(
            run_id=run.id,
            level=Level.WARNING,
            event=Event.RUN_CANCELLED.value,
            message=f"Run cancelled by an operator while {run.status.value}",
            occurred_at=datetime.now(UTC),
            data={"previous_status": run.status.value},
            worker_id=OPERATOR_ID,
            attempt=run.attempt,
        )
        if store.transition(
            run.id,
            run.status,
            Status.CANCELLED,
            [entry],
            error_summary="cancelled by an operator",
        ):
            return store.get_run(run_id)
        # It moved on (a worker took it) in the meantime: flag it instead.
    store.request_cancel(run_id)
    return store.get_run(run_id)
