"""How an attempt ends, mixed into :class:`~worker.runner.Runner`: its fenced state changes
(a checkpoint, an ending) with the entries logged before them, and the endings
themselves — succeeded (publishing the write modes' result), interrupted, cancelled,
failed, or queued again for a retry from its checkpoint."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from worker import wording
from worker.attempt import Attempt, Outcome, error_summary
from worker.destinations import Publish
from worker.errors import LeaseLost, SourceError, StopRequested, StoreUnavailable, is_retryable
from worker.models import Event, Lease, NewEntry, Run, Status, StopReason
from worker.runlog import Logger
from worker.runtime import Runtime
from worker.settings import Settings
from worker.store import Store
from worker.telemetry import Phase, Telemetry

log = logging.getLogger("quarry.worker")

#: How often a paused run asks whether the store is back.
STORE_RETRY_SECONDS = 0.5


class RunEndings:
    """State changes and endings of an attempt (mixed into the runner)."""

    rt: Runtime
    settings: Settings
    store: Store

    def _commit(
        self,
        a: Attempt,
        emit: Callable[[], None],
        *,
        checkpoint: dict[str, Any],
        before_commit: Callable[[], None] | None = None,
        loaded: tuple[int, int] | None = None,
    ) -> None:
        """Commit a checkpoint with its entries (and what was buffered before them) at once;
        ``loaded`` is the ``(rows, bytes)`` of the slice it records, for the pipeline's counters."""
        self._state_change(
            a.lease,
            emit,
            lambda entries: self.store.commit(
                a.lease,
                entries,
                checkpoint=checkpoint,
                summary=a.telemetry.snapshot(),
                before_commit=before_commit,
                loaded=loaded,
            ),
            landed=lambda run: run.checkpoint == checkpoint,
        )
        a.checkpoint = checkpoint

    def _finish(
        self,
        lease: Lease,
        status: Status,
        emit: Callable[[], None],
        *,
        telemetry: Telemetry,
        error: str | None = None,
        before_commit: Publish | None = None,
        interruption: str = "sigterm",
    ) -> None:
        """End the attempt with ``status`` and its entries, in one fenced transaction."""
        self._state_change(
            lease,
            emit,
            lambda entries: self.store.finish(
                lease,
                status,
                entries,
                error_summary=error,
                summary=telemetry.snapshot(),
                before_commit=before_commit,
                interruption=interruption,
            ),
            landed=lambda run: run.status is status,
        )

    def _state_change(
        self,
        lease: Lease,
        emit: Callable[[], None],
        write: Callable[[list[NewEntry]], None],
        *,
        landed: Callable[[Run], bool] | None = None,
    ) -> None:
        """Write a state change with the entries ``emit`` logs and everything buffered before.

        The writer's lock keeps the buffered batches and this transaction in log
        order. If the write fails for another reason than a lost lease, the
        buffered entries go back to the writer: a database blip loses none. A
        checkpoint or an ending (``landed`` says how to recognise it in the run)
        that meets a store outage waits for the store instead: :meth:`_ride_out`.
        """
        writer = self.rt.writer
        with writer.io_lock:
            with self.rt.sink.hold() as held:
                emit()
            earlier = self._take_own(lease.run_id)
            entries = [*earlier, *held]
            try:
                write(entries)
            except LeaseLost:
                raise
            except StoreUnavailable as exc:
                if landed is None:
                    writer.requeue(earlier)
                    raise
                self._ride_out(lease, exc, lambda: write(entries), landed)
            except Exception:
                writer.requeue(earlier)
                raise

    def _ride_out(
        self,
        lease: Lease,
        exc: StoreUnavailable,
        write: Callable[[], None],
        landed: Callable[[Run], bool],
    ) -> None:
        """The store went away during a fenced write: the run pauses until it is back, then
        finds out whether the write landed before the connection dropped (a COMMIT whose
        answer was lost) and writes it if not, so nothing is committed twice or lost.

        Bounded by the lease TTL: past it, the watchdog may have taken the run, so the
        attempt gives up (``LeaseLost``) and the normal recovery resumes it. The fence
        makes a late write harmless either way.
        """
        run_id = lease.run_id
        log.warning("run %s: the store is unavailable (%s); paused until it is back", run_id, exc)
        deadline = time.monotonic() + self.settings.lease_ttl_seconds
        while True:
            if time.monotonic() > deadline:
                log.warning("run %s: the store is still unavailable; the lease is given up", run_id)
                raise LeaseLost(f"{run_id} epoch {lease.epoch}: store unavailable past the TTL")
            time.sleep(STORE_RETRY_SECONDS)
            try:
                if landed(self.store.get_run(run_id)):
                    break
                write()  # fenced: LeaseLost if the run was taken over meanwhile
                break
            except StoreUnavailable:
                continue
        log.warning("run %s: the store is back; the run carries on", run_id)

    def _take_own(self, run_id: str) -> list[NewEntry]:
        pending = self.rt.writer.take()
        own = [e for e in pending if e.run_id == run_id]
        others = [e for e in pending if e.run_id != run_id]
        if others:
            self.rt.writer.requeue(others)
        return own

    # -- endings --------------------------------------------------------------

    def _complete(self, a: Attempt, totals: dict[str, int], publish: Publish | None) -> None:
        elapsed = time.monotonic() - a.started
        # The run's duration is one figure everywhere: from its first start to its end,
        # what `quarry runs show` calls "took"; this attempt's own time is said apart.
        total = max((datetime.now(UTC) - a.first_started).total_seconds(), elapsed)
        message = f"Run completed successfully in {wording.format_duration(total)}"
        if a.lease.attempt > 1:
            message += (
                f" from its first start (attempt {a.lease.attempt} took "
                f"{wording.format_duration(elapsed)})"
            )
        a.telemetry.set(current_phase=Phase.COMPLETED, progress=100.0, current_resource=None)
        self._finish(
            a.lease,
            Status.SUCCEEDED,
            lambda: a.log.info(
                Event.RUN_COMPLETED,
                message=message,
                duration_seconds=round(total, 3),
                attempt_seconds=round(elapsed, 3),
                **totals,
            ),
            telemetry=a.telemetry,
            before_commit=publish,
        )

    def _stop(self, a: Attempt, stop: StopRequested) -> Outcome:
        position = a.checkpoint.get("position")
        if stop.reason is StopReason.CANCELLED:
            a.telemetry.set(current_phase=Phase.CANCELLED)
            self._finish(
                a.lease,
                Status.CANCELLED,
                lambda: a.log.warning(
                    Event.RUN_CANCELLED,
                    message="Run cancelled at a safe point; checkpoint saved",
                    checkpoint=position,
                ),
                telemetry=a.telemetry,
            )
            self._abort(a)
            return Outcome.CANCELLED
        a.telemetry.set(current_phase=Phase.INTERRUPTED)
        where = (
            f"{position['resource']} slice {position['slice']}"
            if position and position.get("slice")
            else (position or {}).get("resource", "start")
        )
        self._finish(
            a.lease,
            Status.INTERRUPTED,
            lambda: a.log.warning(
                Event.RUN_INTERRUPTED,
                message=f"{stop.reason.value} received, checkpoint saved after {where}",
                signal=stop.reason.value,
                checkpoint=position,
            ),
            telemetry=a.telemetry,
            interruption=stop.reason.value.lower(),
        )
        return Outcome.INTERRUPTED

    def _fail(
        self,
        lease: Lease,
        log: Logger,
        telemetry: Telemetry,
        exc: BaseException,
        attempt: Attempt | None,
    ) -> Outcome:
        summary = error_summary(exc)
        retry = self._retry_delay(attempt, exc)
        try:
            if attempt is not None and retry is not None:
                self._queue_retry(attempt, exc, summary, retry)
                return Outcome.RETRYING
            telemetry.set(current_phase=Phase.FAILED)
            self._finish(
                lease,
                Status.FAILED,
                lambda: log.error(
                    Event.RUN_FAILED,
                    message=f"Run failed: {summary}",
                    error=summary,
                    error_type=type(exc).__name__,
                    source_error=isinstance(exc, SourceError),
                    retryable=is_retryable(exc),
                    checkpoint=(attempt.checkpoint.get("position") if attempt else None),
                ),
                telemetry=telemetry,
                error=summary,
            )
        except LeaseLost:
            self.rt.writer.discard(lease.run_id)
            return Outcome.LEASE_LOST
        if attempt is not None:
            self._abort(attempt)
        return Outcome.FAILED

    def _retry_delay(self, a: Attempt | None, exc: BaseException) -> timedelta | None:
        """How long before the next try, when the pipeline's retry policy allows one."""
        if a is None or a.run is None or not is_retryable(exc):
            return None
        if a.heartbeat.cancel_requested.is_set() or a.run.retries >= a.pipeline.retries:
            return None
        base, cap = a.pipeline.retry_delay, a.pipeline.retry_max_delay
        ceiling: timedelta = min(cap, base * 2**a.run.retries)
        # Jitter: runs that failed together (a database restart) do not retry together.
        return ceiling * random.uniform(0.5, 1.0)  # noqa: S311 - jitter, not crypto

    def _queue_retry(self, a: Attempt, exc: BaseException, summary: str, delay: timedelta) -> None:
        assert a.run is not None
        due = datetime.now(UTC) + delay
        number = a.run.retries + 1
        position = a.checkpoint.get("position")
        a.telemetry.set(current_phase=Phase.RETRYING)
        self._state_change(
            a.lease,
            lambda: a.log.warning(
                Event.RUN_RETRY,
                message=(
                    f"Attempt {a.lease.attempt} failed: {summary}; retry {number}/"
                    f"{a.pipeline.retries} at {due:%H:%M:%S} UTC "
                    f"(in {wording.format_duration(delay.total_seconds())}), from its checkpoint"
                ),
                error=summary,
                error_type=type(exc).__name__,
                retry=number,
                retries=a.pipeline.retries,
                next_attempt=a.lease.attempt + 1,
                not_before=due.isoformat(),
                delay_seconds=round(delay.total_seconds(), 3),
                checkpoint=position,
            ),
            lambda entries: self.store.requeue_for_retry(
                a.lease,
                entries,
                not_before=due,
                error_summary=summary,
                summary=a.telemetry.snapshot(),
            ),
        )

    def _abort(self, a: Attempt) -> None:
        """After a terminal failure or cancel: what the write modes must not leave behind."""
        if a.destination is None:
            return
        try:
            a.destination.abort(a.scope(), a.log)
        except Exception as exc:
            a.log.warning(
                Event.RUN_CLEANUP_FAILED,
                message=f"Could not remove the run's output: {error_summary(exc)}",
                error=error_summary(exc),
            )
