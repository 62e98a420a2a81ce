"""The heartbeat: a supervised thread that renews the lease and stores telemetry.

It renews every ``lease_renew_seconds``; a renew that finds a newer epoch
marks the lease lost and the runner stops at its next safe point, writing
nothing more. A renew that fails for another reason (the database is briefly
away) is retried quickly; once the last good renew is older than the TTL the
lease must be presumed lost too, since the watchdog may already have taken it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from worker import workermetrics
from worker.errors import LeaseLost, StoreUnavailable
from worker.models import Event, Lease, Level, NewEntry, Status
from worker.runlog import Logger
from worker.scrub import describe
from worker.settings import Settings
from worker.store import Store
from worker.telemetry import Telemetry

#: Wait between renew retries after a failed renew.
RETRY_SECONDS = 1.0
#: A runner that has not stopped this long after its lease was lost (a forced cancel,
#: a takeover) is stuck in a call that does not return: its process is ended.
LOST_GRACE_SECONDS = 5.0
#: And one still running this long past its run_timeout is ended the same way.
TIMEOUT_GRACE_SECONDS = 60.0


def _fmt_int(value: Any) -> str:
    return f"{int(value or 0):,}"


class Heartbeat:
    """Keeps one lease alive while the runner works."""

    def __init__(
        self,
        store: Store,
        lease: Lease,
        settings: Settings,
        telemetry: Telemetry,
        log: Logger,
        *,
        terminate: Callable[[str], None] | None = None,
    ) -> None:
        self.store = store
        self.lease = lease
        self.settings = settings
        self.telemetry = telemetry
        self.log = log
        self.lost = threading.Event()
        self._failing = False  # renewals are failing (the store is away)
        self.cancel_requested = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="quarry-heartbeat", daemon=True)
        self._last_ok = time.monotonic()
        self.renewals = 0
        #: When the attempt must have ended (monotonic clock; the runner's run_timeout).
        self.deadline = float("inf")
        #: Ends the process of a runner stuck in a call that never returns (pool children).
        self.terminate = terminate
        #: The lease was taken from us (the epoch moved on), not merely unrenewable.
        self.taken = False

    def start(self) -> None:
        """Start renewing."""
        self._thread.start()

    def stop(self) -> None:
        """Stop renewing (the lease is then released or left to expire)."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)

    @property
    def healthy(self) -> bool:
        """Whether the lease is held and the heartbeat thread is alive to keep it."""
        return not self.lost.is_set() and (self._thread.is_alive() or self._stop.is_set())

    def _run(self) -> None:
        next_renew = time.monotonic() + self.settings.lease_renew_seconds
        next_sample = time.monotonic()
        next_log = time.monotonic() + self.settings.heartbeat_log_seconds
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                if now >= next_sample:
                    self._sample()
                    next_sample = now + self.settings.telemetry_sample_seconds
                if now >= next_renew:
                    ok = self._renew()
                    next_renew = now + (self.settings.lease_renew_seconds if ok else RETRY_SECONDS)
                    if self.lost.is_set():
                        self._watch_lost()
                        return
                if now >= self.deadline + TIMEOUT_GRACE_SECONDS:
                    self._end_stuck()
                    return
                if now >= next_log:
                    self._log_heartbeat()
                    next_log = now + self.settings.heartbeat_log_seconds
                wait = min(next_renew, next_sample, next_log) - time.monotonic()
                self._stop.wait(max(wait, 0.05))
        except Exception:
            # A heartbeat that cannot go on cannot vouch for the lease.
            logging.getLogger("quarry.heartbeat").exception("heartbeat crashed")
            self.lost.set()

    def _watch_lost(self) -> None:
        """The lease is gone: the runner stops at its next safe point, or is ended.

        Its next check (at most a quarter second away while a page is read) raises
        :class:`LeaseLost`. A runner stuck in a call that never returns (a write to a
        destination that hangs) never checks: past the grace its process is ended, which
        is safe because the fence refuses anything it would still write.
        """
        if not self.taken or self.terminate is None:
            return  # unrenewable (the store is away): the runner's own writes will fail
        if self._stop.wait(LOST_GRACE_SECONDS):
            return
        self.terminate(
            f"run {self.lease.run_id}: its lease is gone (cancelled by force or taken over) "
            f"and the runner has not stopped within {LOST_GRACE_SECONDS:g}s"
        )

    def _end_stuck(self) -> None:
        """Past run_timeout and its grace, the runner never reached a check: end the run
        ``failed`` as its holder, then the process."""
        reason = "the attempt exceeded its run_timeout and the worker was stuck in a call"
        entry = NewEntry(
            run_id=self.lease.run_id,
            level=Level.ERROR,
            event=Event.RUN_FAILED.value,
            message=f"Run failed: {reason}; its worker process is ended",
            occurred_at=datetime.now(UTC),
            data={"error": reason, "error_type": "RunTimeout", "retryable": False},
            worker_id=self.lease.owner,
            attempt=self.lease.attempt,
            epoch=self.lease.epoch,
        )
        try:
            self.store.finish(
                self.lease, Status.FAILED, [entry], error_summary=reason, cleanup_owed=True
            )
        except Exception:
            logging.getLogger("quarry.heartbeat").warning("stuck run not ended", exc_info=True)
        self.lost.set()
        if self.terminate is not None:
            self.terminate(f"run {self.lease.run_id}: {reason}")

    def _renew(self) -> bool:
        started = time.monotonic()
        try:
            cancel = self.store.renew(
                self.lease, self.settings.lease_ttl_seconds, self.telemetry.snapshot()
            )
        except LeaseLost:
            self.taken = True
            self.lost.set()
            return False
        except Exception as exc:
            if not self._failing:  # one line per outage, not one a second
                logging.getLogger("quarry.heartbeat").warning(
                    "run %s: lease renew failed (%s); retrying every %.0fs for up to the TTL",
                    self.lease.run_id,
                    describe(exc),
                    RETRY_SECONDS,
                )
                self._failing = True
            if time.monotonic() - self._last_ok >= self.settings.lease_ttl_seconds:
                self.lost.set()
            return False
        finally:
            workermetrics.renewed(started)
        if self._failing:
            logging.getLogger("quarry.heartbeat").warning(
                "run %s: lease renewed again", self.lease.run_id
            )
            self._failing = False
        self._last_ok = time.monotonic()
        self.renewals += 1
        if cancel:
            self.cancel_requested.set()
        return True

    def _sample(self) -> None:
        snapshot = self.telemetry.snapshot()
        values: dict[str, Any] = {
            k: snapshot[k]
            for k in ("rows_loaded", "bytes_loaded", "files_written", "progress")
            if k in snapshot
        }
        try:
            self.store.append_sample(
                self.lease.run_id,
                values,
                cap=self.settings.telemetry_max_samples,
                epoch=self.lease.epoch,
            )
        except StoreUnavailable:
            pass  # the renew says so, once per outage; a sample is not worth more lines
        except Exception:
            logging.getLogger("quarry.heartbeat").warning("telemetry sample failed", exc_info=True)

    def _log_heartbeat(self) -> None:
        snapshot = self.telemetry.snapshot()
        self.log.info(
            Event.HEARTBEAT,
            message=(
                f"Heartbeat: {_fmt_int(snapshot.get('rows_loaded'))} rows, "
                f"{snapshot.get('progress', 0):.0f}% done"
            ),
            rows_loaded=snapshot.get("rows_loaded"),
            progress=snapshot.get("progress"),
            current_resource=snapshot.get("current_resource"),
            renewals=self.renewals,
        )
