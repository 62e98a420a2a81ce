"""The runner: executes one run under its lease, resource by resource, slice by slice.

It emits the lifecycle events, checkpoints after every slice (the slice file
is published inside the same fenced transaction as the checkpoint and its
``slice_completed`` entry), checks for SIGTERM, cancellation, a lost lease and
its time limit while pages are read, and ends the run as succeeded, failed,
interrupted, cancelled or queued for a retry (those endings are
:mod:`worker.endings`). It never builds a query: all I/O goes through the store.
"""

from __future__ import annotations

import contextlib
import threading
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from worker import checkpoints, wording, workermetrics
from worker.attempt import Attempt, Outcome, error_summary
from worker.destinations import (
    Destination,
    SliceKey,
    StagedSlice,
    WriteSpec,
    build_destination,
)
from worker.endings import RunEndings
from worker.envrefs import resolve_and_register
from worker.errors import (
    LeaseLost,
    QuarryError,
    RunTimeout,
    StopRequested,
    StoreUnavailable,
)
from worker.heartbeat import Heartbeat
from worker.models import Event, Lease, NewEntry, Run, Status, StopReason
from worker.pipelines import (
    Pipeline,
    ResourceConfig,
    Window,
    format_bound,
    get_pipeline,
    plan_slices,
)
from worker.runlog import get_logger
from worker.runtime import Runtime
from worker.scrub import scrubber
from worker.signals import StopFlag
from worker.sources import Source, build_source
from worker.sources.base import ReadContext, decode_mark, encode_mark
from worker.store.store import Waiting
from worker.telemetry import Phase, Telemetry

#: Longest wait for a source to close (a hung read may hold its connection).
CLOSE_SECONDS = 5.0


class Runner(RunEndings):
    """Executes runs in this process."""

    def __init__(
        self,
        runtime: Runtime,
        stop: StopFlag,
        terminate: Callable[[str], None] | None = None,
        on_lease: Callable[[Lease], None] | None = None,
    ) -> None:
        self.rt = runtime
        self.settings = runtime.settings
        self.store = runtime.store
        self.stop = stop
        #: Ends this process when its runner is stuck past the point of stopping (a pool
        #: child only; see :class:`~worker.heartbeat.Heartbeat`).
        self.terminate = terminate
        #: Told the lease as soon as it is taken (the pool child notes it for its
        #: worker's main process: :mod:`worker.consuming`).
        self.on_lease = on_lease

    # -- entry point ----------------------------------------------------------

    def execute(self, run_id: str) -> Outcome:
        """Take the lease on ``run_id`` and run it; a second delivery is a no-op.

        A run over its pipeline's ``max_active_runs`` is not taken: it stays queued
        (``waiting``), with an entry naming the run it waits for.
        """
        owner = self.settings.identity()
        quiet = get_logger(worker_id=owner, run=run_id)  # stdout only: no run_id, no entry
        base_log = get_logger(run_id=run_id, worker_id=owner)
        try:
            queued = self.store.get_run(run_id)
        except QuarryError:
            quiet.info("lease_not_acquired", message="Run is not in the store; skipping")
            return Outcome.SKIPPED
        declared: Pipeline | None = None
        # A broken file: taken without a limit, the run fails below with the config error.
        with contextlib.suppress(QuarryError):
            declared = get_pipeline(self.settings.pipelines_file, queued.pipeline)

        def acquired(lease: Lease) -> list[NewEntry]:
            interval = _interval_fields(queued)
            with self.rt.sink.hold() as held:
                base_log.bind(attempt=lease.attempt, epoch=lease.epoch).info(
                    Event.LEASE_ACQUIRED,
                    message=f"Worker {owner} took ownership (attempt {lease.attempt})",
                    lease_epoch=lease.epoch,
                    lease_ttl_seconds=self.settings.lease_ttl_seconds,
                    **interval,
                )
            return held

        def waiting(blocker: str) -> list[NewEntry]:
            limit = declared.max_active_runs if declared else 1
            with self.rt.sink.hold() as held:
                base_log.bind(attempt=queued.attempt).info(
                    Event.RUN_WAITING,
                    message=(
                        f"Waiting for {blocker}: {queued.pipeline} allows "
                        f"{wording.plural(limit, 'active run')} (max_active_runs)"
                    ),
                    waiting_for=blocker,
                    max_active_runs=limit,
                )
            return held

        taken = self.store.acquire(
            run_id,
            owner,
            self.settings.lease_ttl_seconds,
            acquired,
            max_active=declared.max_active_runs if declared else None,
            on_wait=waiting,
        )
        if isinstance(taken, Waiting):
            quiet.info("run_waiting", message=f"Run waits for {taken.blocker}; left queued")
            return Outcome.WAITING
        if taken is None:
            quiet.info("lease_not_acquired", message="Run is not claimable here; skipping")
            return Outcome.SKIPPED
        lease = taken
        if self.on_lease is not None:
            self.on_lease(lease)
        log = base_log.bind(attempt=lease.attempt, epoch=lease.epoch)
        run = self.store.get_run(run_id)
        telemetry = Telemetry(1, run.telemetry_summary)
        heartbeat = Heartbeat(
            self.store, lease, self.settings, telemetry, log, terminate=self.terminate
        )
        attempt: Attempt | None = None
        workermetrics.run_began()
        try:
            pipeline = declared or get_pipeline(self.settings.pipelines_file, run.pipeline)
            attempt = Attempt(
                lease,
                log,
                pipeline,
                run.checkpoint,
                telemetry,
                heartbeat,
                time.monotonic(),
                run.started_at or datetime.now(UTC),
                run=run,
                deadline=time.monotonic() + pipeline.run_timeout.total_seconds(),
            )
            heartbeat.deadline = attempt.deadline
            heartbeat.start()
            return self._run(attempt, run.params)
        except LeaseLost:
            quiet.warning("lease_lost", message="Lease taken over; stopped without writing more")
            return self._lease_lost(run_id, attempt)
        except Exception as exc:
            return self._fail(lease, log, telemetry, exc, attempt)
        finally:
            heartbeat.stop()
            self.rt.refused.pop(run_id, None)
            workermetrics.run_ended()

    def _lease_lost(self, run_id: str, attempt: Attempt | None) -> Outcome:
        self.rt.writer.discard(run_id)
        with contextlib.suppress(StoreUnavailable):  # given up in a store outage
            if (
                attempt is not None
                and self.store.get_run(run_id).status.terminal
                and self.store.claim_cleanup(run_id)
            ):
                # Ended by someone else (a forced cancel): nobody writes to it any more,
                # so what its write modes must not leave can go (unless the watchdog,
                # which waits for a stuck worker, already did: worker.cleanup).
                self._abort(attempt)
        return Outcome.LEASE_LOST

    # -- the extraction -------------------------------------------------------

    def _run(self, a: Attempt, params: dict[str, Any]) -> Outcome:
        pipeline = a.pipeline
        # Secret references resolve here, at run time, and are registered with the
        # scrubber before anything can log them. Run params are taken literally.
        source_options = resolve_and_register(pipeline.source.options(), "source")
        destination_options = resolve_and_register(pipeline.destination.options(), "destination")
        a.previous_marks = self._previous_marks(pipeline.name)
        source = build_source(pipeline.source.type, {**source_options, **params})
        destination: Destination | None = None
        try:
            destination = build_destination(
                pipeline.destination.type, destination_options, self.settings.files_root
            )
            a.destination = destination
            interval = _interval(a.run)
            plans = {
                r.name: (plan_slices(r.slices, interval) if r.slices else None)
                for r in pipeline.resources
            }
            a.telemetry.units_total = sum(len(p) if p else 1 for p in plans.values())
            a.telemetry.unit_done(self._units_already_done(a.checkpoint, plans))
            names = [r.name for r in pipeline.resources]
            a.telemetry.set(current_phase=Phase.EXTRACTING)
            a.log.info(
                Event.EXTRACTION_STARTED,
                message=f"Starting extraction from {pipeline.source.type}",
                resources=names,
                source=pipeline.source.type,
                destination=destination.describe(),
                resumed=bool(a.checkpoint.get("resources")),
                **_interval_fields(a.run),
            )
            try:
                for position, resource in enumerate(pipeline.resources):
                    self._resource(
                        a,
                        source=source,
                        destination=destination,
                        resource=resource,
                        position=position,
                        plan=plans[resource.name],
                    )
            except StopRequested as stop:
                return self._stop(a, stop)
            totals = checkpoints.totals(a.checkpoint)
            self._check(a)
            publish = destination.prepare_finish(a.scope(), a.log)
            a.log.info(
                Event.EXTRACTION_COMPLETED,
                message=(
                    f"Extracted {wording.plural(len(names), 'resource')}: "
                    f"{wording.tally(totals['rows'], totals['files'])}"
                ),
                resources=len(names),
                **totals,
            )
            self._complete(a, totals, publish)
            return Outcome.SUCCEEDED
        finally:
            a.reader.close()
            _close_quietly(source)
            if destination is not None:
                destination.close()

    def _previous_marks(self, pipeline: str) -> dict[str, Any]:
        """Each resource's high-water mark from the last successful run of ``pipeline``."""
        last = self.store.list_runs(status=Status.SUCCEEDED, pipeline=pipeline, limit=1)
        if not last:
            return {}
        resources = last[0].checkpoint.get("resources", {})
        return {
            name: state["high_water"]
            for name, state in resources.items()
            if isinstance(state, dict) and state.get("high_water") is not None
        }

    @staticmethod
    def _units_already_done(
        checkpoint: dict[str, Any], plans: dict[str, list[Window] | None]
    ) -> int:
        done = 0
        for name, plan in plans.items():
            if checkpoints.is_resource_done(checkpoint, name):
                done += len(plan) if plan else 1
            elif plan:
                done += checkpoints.next_slice(checkpoint, name) - 1
        return done

    def _resource(
        self,
        a: Attempt,
        *,
        source: Source,
        destination: Destination,
        resource: ResourceConfig,
        position: int,
        plan: list[Window] | None,
    ) -> None:
        name = resource.name
        total = len(a.pipeline.resources)
        if checkpoints.is_resource_done(a.checkpoint, name):
            return
        started = time.monotonic()
        resume_from = checkpoints.next_slice(a.checkpoint, name) if plan else None
        label = f"Extracting {name} ({position + 1}/{total})" + (", sliced" if plan else "")
        if plan and resume_from and resume_from > 1:
            label += f", resuming at slice {resume_from}/{len(plan)}"
        a.telemetry.set(current_resource=name)
        a.log.info(
            Event.RESOURCE_STARTED,
            message=label,
            resource=name,
            completed_count=position,
            total_count=total,
            sliced=plan is not None,
            total_slices=len(plan) if plan else None,
            resume_from_slice=resume_from if plan else None,
        )
        try:
            if plan is None:
                self._slice(a, source, destination, resource, None)
            else:
                for window in plan[(resume_from or 1) - 1 :]:
                    self._slice(a, source, destination, resource, window)
        except (StopRequested, LeaseLost):
            raise
        except Exception as exc:
            a.log.error(
                Event.RESOURCE_FAILED,
                message=f"Failed {name}: {error_summary(exc)}",
                resource=name,
                error=error_summary(exc),
                error_type=type(exc).__name__,
                traceback=scrubber.text("".join(traceback.format_exception(exc)[-3:])),
            )
            raise
        state = checkpoints.resource_state(a.checkpoint, name)
        rows, files = int(state.get("rows", 0)), int(state.get("files", 0))
        duration = round(time.monotonic() - started, 3)
        checkpoint = checkpoints.record_resource_done(a.checkpoint, name)
        self._commit(
            a,
            lambda: a.log.info(
                Event.RESOURCE_COMPLETED,
                message=(f"Completed {name}: {wording.tally(rows, files)}"),
                resource=name,
                rows=rows,
                files=files,
                bytes=int(state.get("bytes", 0)),
                duration_seconds=duration,
            ),
            checkpoint=checkpoint,
        )

    def _slice(
        self,
        a: Attempt,
        source: Source,
        destination: Destination,
        resource: ResourceConfig,
        window: Window | None,
    ) -> None:
        name = resource.name
        self._check(a)
        started = time.monotonic()
        if window is not None:
            a.log.info(
                Event.SLICE_STARTED,
                message=f"Slice {window.index}/{window.total} for {name}",
                resource=name,
                slice=window.index,
                total_slices=window.total,
                window_start=format_bound(window.start),
                window_end=format_bound(window.end),
            )
        key = SliceKey(
            a.pipeline.name,
            a.lease.run_id,
            name,
            window.index if window else 0,
            a.lease.epoch,
            WriteSpec.of(resource),
        )
        state = checkpoints.resource_state(a.checkpoint, name)
        since = state["since"] if "since" in state else a.previous_marks.get(name)
        context = ReadContext(
            log=a.log,
            since=decode_mark(since),
            high_water=decode_mark(state.get("high_water", since)),
            pause=lambda seconds: self._pause(a, seconds),
        )
        staged: StagedSlice = destination.stage(key, a.log)
        try:
            pages = a.reader.read(
                source.read(resource, window, context),
                page_timeout=a.pipeline.page_timeout.total_seconds(),
                check=lambda: self._check(a),
                what=f"{name}" + (f" slice {window.index}/{window.total}" if window else ""),
            )
            for page in pages:
                staged.write(page)
                self._check(a)
            stats = staged.seal()
            seconds = time.monotonic() - started
            checkpoint = checkpoints.record_slice(
                a.checkpoint,
                name,
                index=key.index,
                rows=stats.rows,
                files=stats.files,
                bytes_=stats.bytes,
                seconds=seconds,
                since=since,
                high_water=encode_mark(context.high_water),
                total=window.total if window is not None else None,
            )
            emit: Callable[[], None] = lambda: None  # noqa: E731 - an unsliced resource says nothing
            if window is not None:
                emit = lambda: a.log.info(  # noqa: E731 - reads best next to its use
                    Event.SLICE_COMPLETED,
                    message=(
                        f"Slice {window.index}/{window.total}: {wording.plural(stats.rows, 'row')}"
                    ),
                    resource=name,
                    slice=window.index,
                    total_slices=window.total,
                    rows=stats.rows,
                    bytes=stats.bytes,
                    duration_seconds=round(seconds, 3),
                )
            a.telemetry.add(rows=stats.rows, bytes_=stats.bytes, files=stats.files)
            a.telemetry.unit_done()
            self._commit(
                a,
                emit,
                checkpoint=checkpoint,
                before_commit=staged.publish,
                loaded=(stats.rows, stats.bytes),
            )
        except BaseException:
            staged.discard()
            raise

    # -- safe points and transactions ----------------------------------------

    def _check(self, a: Attempt) -> None:
        """A safe point: stop here if the lease is gone, SIGTERM arrived or cancel was asked."""
        if not a.heartbeat.healthy or a.lease.epoch in self.rt.refused.get(a.lease.run_id, ()):
            raise LeaseLost(f"{a.lease.run_id} epoch {a.lease.epoch}")
        if self.stop.requested:
            raise StopRequested(self.stop.signal_name or StopReason.SIGTERM)
        if a.heartbeat.cancel_requested.is_set():
            raise StopRequested(StopReason.CANCELLED)
        if time.monotonic() > a.deadline:
            limit = wording.format_duration(a.pipeline.run_timeout.total_seconds())
            raise RunTimeout(f"the attempt ran longer than its run_timeout ({limit})")

    def _pause(self, a: Attempt, seconds: float) -> None:
        """A source's backoff sleep, itself a safe point: it ends early on a stop."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self._check(a)
            self.stop.wait(min(left, 0.25))
        self._check(a)


def _interval(run: Run | None) -> tuple[datetime, datetime] | None:
    if run is None or run.interval_start is None or run.interval_end is None:
        return None
    return run.interval_start, run.interval_end


def _interval_fields(run: Run | None) -> dict[str, Any]:
    """A run's data interval, for the entries that open an attempt (none when it has none)."""
    interval = _interval(run)
    if interval is None:
        return {}
    return {"interval_start": interval[0].isoformat(), "interval_end": interval[1].isoformat()}


def _close_quietly(source: Source) -> None:
    """Close a source without waiting on a reader thread that a hung page left blocked."""
    closer = threading.Thread(target=source.close, name="quarry-source-close", daemon=True)
    closer.start()
    closer.join(timeout=CLOSE_SECONDS)
