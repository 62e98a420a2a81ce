"""One attempt of a run, as the runner and its endings share it: what it carries, how an
execution ended, and the error summary a run stores."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from worker.destinations import Destination, RunScope, WriteSpec
from worker.errors import QuarryError
from worker.heartbeat import Heartbeat
from worker.models import Lease, Run
from worker.pipelines import Pipeline
from worker.reading import PageReader
from worker.runlog import Logger
from worker.scrub import scrubber
from worker.telemetry import Telemetry

#: Longest error summary stored on a run.
MAX_ERROR_SUMMARY = 2000


class Outcome(enum.StrEnum):
    """How one execution of ``execute_run`` ended."""

    SKIPPED = "skipped"  # the lease was not ours to take: a duplicate delivery
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    INTERRUPTED = "interrupted"
    CANCELLED = "cancelled"
    LEASE_LOST = "lease_lost"
    #: Queued again for a retry, from its checkpoint, after a transient failure.
    RETRYING = "retrying"
    #: Not started: ``max_active_runs`` runs of its pipeline are active.
    WAITING = "waiting"

    @property
    def ended(self) -> bool:
        """Whether the run reached a terminal status in this execution."""
        return self in {Outcome.SUCCEEDED, Outcome.FAILED, Outcome.CANCELLED}


@dataclass
class Attempt:
    """What one attempt of a run carries around."""

    lease: Lease
    log: Logger
    pipeline: Pipeline
    checkpoint: dict[str, Any]
    telemetry: Telemetry
    heartbeat: Heartbeat
    started: float
    #: When the run first started (its first attempt), for the run's whole duration.
    first_started: datetime
    #: The run as it was when this attempt took it (params, data interval, retries).
    run: Run | None = None
    #: When this attempt must have ended (``run_timeout``), on the monotonic clock.
    deadline: float = float("inf")
    #: High-water marks (JSON-encoded) of the last successful run, by resource.
    previous_marks: dict[str, Any] = field(default_factory=dict)
    destination: Destination | None = None
    #: The thread this attempt's pages are read in (see worker/reading.py).
    reader: PageReader = field(default_factory=PageReader)

    def scope(self) -> RunScope:
        """The run as its destination sees it at the end."""
        return RunScope(
            self.pipeline.name,
            self.lease.run_id,
            self.lease.epoch,
            {r.name: WriteSpec.of(r) for r in self.pipeline.resources},
        )


def error_summary(exc: BaseException) -> str:
    """A scrubbed, bounded one-line description of ``exc``."""
    text = str(exc) if isinstance(exc, QuarryError) else f"{type(exc).__name__}: {exc}"
    return scrubber.text(text)[:MAX_ERROR_SUMMARY]
