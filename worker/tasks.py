"""Celery at the edge: thin task functions and the worker's process hooks."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from typing import Any

from celery import signals as celery_signals

from worker import consuming, signals, webhooks, workermetrics
from worker.attempt import Outcome
from worker.celery_app import EXECUTE_RUN, WEBHOOK, app
from worker.errors import QuarryError, first_line
from worker.pipelines import get_pipeline
from worker.publish import publish_resumed, publish_run
from worker.recovery import fast_recover, wake_waiting
from worker.runner import Runner
from worker.runtime import close_runtime, get_runtime, prepare_store
from worker.scrub import scrub
from worker.settings import get_settings
from worker.store.webhooks import DeliveryStatus

log = logging.getLogger("quarry.worker")


# Acked when a pool process starts it: the lease owns the run (worker/consuming.py).
@app.task(name=EXECUTE_RUN, ignore_result=True, acks_late=False)
def execute_run(run_id: str) -> str:
    """Execute one run; a delivery for a run someone else holds returns ``skipped``."""
    # billiard installs, after worker_process_init, a SIGTERM handler that raises
    # SystemExit wherever the child happens to be (inside a COMMIT, say). Ours only
    # sets a flag; install it here, where nothing can replace it before the run.
    signals.install()
    signals.stop_flag.clear()
    runtime = get_runtime()
    runner = Runner(runtime, signals.stop_flag, terminate=_terminate, on_lease=consuming.note_lease)
    try:
        outcome = runner.execute(run_id)
    finally:
        consuming.clear_note()
    if outcome.ended or outcome is Outcome.LEASE_LOST:
        _wake_next(run_id)
    if outcome is Outcome.INTERRUPTED:
        # Wake the watchdog now rather than at its next sweep: another worker
        # resumes the run within seconds of this one stopping.
        try:
            fast_recover(
                runtime.store, run_id, publish_resumed, max_attempts=runtime.settings.max_attempts
            )
        except Exception:
            log.warning("fast recovery of %s failed; the watchdog will retry", run_id)
    return outcome.value


def _wake_next(run_id: str) -> None:
    """A run ended: start the next run of its pipeline that ``max_active_runs`` held back."""
    runtime = get_runtime()
    try:
        run = runtime.store.get_run(run_id)
        limit = 1
        with contextlib.suppress(QuarryError):
            limit = get_pipeline(runtime.settings.pipelines_file, run.pipeline).max_active_runs
        wake_waiting(runtime.store, run.pipeline, limit, publish_run)
    except Exception:
        log.warning("waking the runs waiting behind %s failed; the watchdog will", run_id)


def _terminate(reason: str) -> None:
    """End this pool child: its runner is stuck in a call that never returns.

    Safe because the lease fence refuses whatever the stuck call would still write;
    Celery starts a new child, and the message it gives back finds the run ended.
    """
    from billiard.process import current_process  # noqa: PLC0415 - only when it happens

    if current_process().name == "MainProcess":  # the solo pool: the worker itself
        sys.stderr.write(f"quarry worker: {reason}; not a pool child, left running\n")
        return
    sys.stderr.write(f"quarry worker: {reason}; ending pool process {os.getpid()}\n")
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


@app.task(name=WEBHOOK, bind=True, ignore_result=True, max_retries=webhooks.MAX_ATTEMPTS)
def deliver_webhook(self: Any, delivery_id: int) -> str:
    """POST one webhook; retry with exponential backoff until it is delivered or given up."""
    runtime = get_runtime()
    if webhooks.deliver(runtime.store, runtime.settings, delivery_id):
        return "delivered"
    delivery = runtime.store.get_delivery(delivery_id)
    if delivery.status is DeliveryStatus.FAILED:
        return "failed"
    raise self.retry(countdown=min(2**delivery.attempts, webhooks.MAX_BACKOFF))


@celery_signals.worker_init.connect
def _on_worker_init(**_kwargs: Any) -> None:
    # Celery logs and swallows exceptions from signal handlers; a worker that cannot
    # reach its store must not start consuming runs, so exit with a clear line.
    try:
        prepare_store()
    except Exception as exc:
        message = f"quarry worker: cannot use the store at {scrub(get_settings().store_url)}: "
        sys.stderr.write(message + scrub(first_line(exc)) + "\n")
        raise SystemExit(1) from None
    # Before the pool forks: its processes write to the directory this serves.
    port = get_settings().worker_metrics_port
    try:
        workermetrics.start(get_settings())
    except OSError as exc:
        sys.stderr.write(f"quarry worker: cannot serve metrics on port {port}: {exc}\n")
        raise SystemExit(1) from None
    # Before the pool forks too: each pool process notes its lease there.
    consuming.open_notes()


@celery_signals.worker_shutdown.connect
def _on_worker_shutdown(**_kwargs: Any) -> None:
    consuming.close_notes()


@celery_signals.worker_shutting_down.connect
def _on_shutting_down(how: str = "Warm", **_kwargs: Any) -> None:
    # Runs in the main process, inside Celery's SIGTERM/SIGQUIT handler. Take no more
    # messages first: the ones the stopping runs publish to resume go to other workers.
    consuming.GATE.stop_taking()
    signals.forward_to_children(signal.SIGTERM)
    if how == "Warm":
        settings = get_settings()
        signals.arm_deadline(settings.shutdown_grace_seconds, settings.soft_shutdown_seconds)


@celery_signals.worker_process_init.connect
def _on_process_init(**_kwargs: Any) -> None:
    workermetrics.process_init()
    get_runtime()


@celery_signals.worker_process_shutdown.connect
def _on_process_shutdown(**_kwargs: Any) -> None:
    try:
        close_runtime()
    finally:
        workermetrics.process_shutdown()
