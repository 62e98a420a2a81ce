"""The run record, its status machine and the run-log vocabulary, as plain data."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


class Status(enum.StrEnum):
    """Where a run is in its life."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"

    @property
    def terminal(self) -> bool:
        """Whether no further transition can leave this status."""
        return self in TERMINAL


TERMINAL = frozenset({Status.SUCCEEDED, Status.FAILED, Status.CANCELLED})

#: Every legal status change; the store refuses any other.
TRANSITIONS: dict[Status, frozenset[Status]] = {
    Status.QUEUED: frozenset({Status.RUNNING, Status.CANCELLED}),
    Status.RUNNING: frozenset(
        {
            Status.SUCCEEDED,
            Status.FAILED,
            Status.CANCELLED,
            Status.INTERRUPTED,
            Status.QUEUED,  # watchdog recovery of an expired lease
        }
    ),
    Status.INTERRUPTED: frozenset({Status.QUEUED, Status.CANCELLED, Status.FAILED}),
    Status.SUCCEEDED: frozenset(),
    Status.FAILED: frozenset(),
    Status.CANCELLED: frozenset(),
}


def can_transition(current: Status, target: Status) -> bool:
    """Whether the state machine allows ``current`` → ``target``."""
    return target in TRANSITIONS[current]


class StopReason(enum.StrEnum):
    """Why a run stopped at a safe point: an operator's cancel, or the signal that arrived."""

    CANCELLED = "cancelled"
    SIGTERM = "SIGTERM"
    SIGINT = "SIGINT"
    SIGQUIT = "SIGQUIT"


class Level(enum.StrEnum):
    """Severity of a log entry; ``warn`` is accepted as input for ``warning``."""

    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"

    @classmethod
    def parse(cls, value: str) -> Level:
        """Read a level name, accepting ``warn`` and any case."""
        name = value.strip().lower()
        if name == "warn":
            return cls.WARNING
        return cls(name)

    @property
    def rank(self) -> int:
        """Order of severity, for ``level >= warning`` filters."""
        return _LEVEL_RANK[self]


_LEVEL_RANK = {Level.DEBUG: 10, Level.INFO: 20, Level.WARNING: 30, Level.ERROR: 40}


class Event(enum.StrEnum):
    """The run-log vocabulary."""

    EXTRACTION_STARTED = "extraction_started"
    RESOURCE_STARTED = "resource_started"
    RESOURCE_COMPLETED = "resource_completed"
    RESOURCE_FAILED = "resource_failed"
    SLICE_STARTED = "slice_started"
    SLICE_COMPLETED = "slice_completed"
    EXTRACTION_COMPLETED = "extraction_completed"
    LEASE_ACQUIRED = "lease_acquired"
    HEARTBEAT = "heartbeat"
    RUN_INTERRUPTED = "run_interrupted"
    RUN_CANCELLED = "run_cancelled"
    RUN_COMPLETED = "run_completed"
    RUN_FAILED = "run_failed"
    WATCHDOG_RECOVERY = "watchdog_recovery"
    WATCHDOG_FAST_RECOVERY = "watchdog_fast_recovery"
    WATCHDOG_CANCELLED = "watchdog_cancelled"
    LOG_TRUNCATED = "log_truncated"
    SCHEMA_CHANGED = "schema_changed"
    SOURCE_RETRY = "source_retry"
    RUN_RETRY = "run_retry"
    RUN_WAITING = "run_waiting"
    RUN_UNPUBLISHED = "run_unpublished"
    RUN_CLEANUP_FAILED = "run_cleanup_failed"
    RUN_CLEANED_UP = "run_cleaned_up"


#: Events after which a run's log gets no more entries until it is re-queued.
TERMINAL_EVENTS = frozenset(
    {Event.RUN_COMPLETED, Event.RUN_FAILED, Event.RUN_CANCELLED, Event.WATCHDOG_CANCELLED}
)


@dataclass(frozen=True, slots=True)
class Run:
    """One execution of a pipeline, as stored."""

    id: str
    pipeline: str
    status: Status
    attempt: int
    params: dict[str, Any]
    gateway: str | None
    lease_owner: str | None
    lease_epoch: int
    lease_expires_at: float | None
    heartbeat_at: datetime | None
    checkpoint: dict[str, Any]
    telemetry_summary: dict[str, Any]
    error_summary: str | None
    cancel_requested: bool
    created_at: datetime
    queued_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime
    #: How the run started: ``manual``, ``schedule`` or ``backfill`` (:class:`Trigger`).
    trigger: str = "manual"
    #: Who triggered it: the API token's name, ``cli``, or None for the schedule.
    triggered_by: str | None = None
    fire_time: datetime | None = None
    interval_start: datetime | None = None
    interval_end: datetime | None = None
    #: A run waiting for its retry is not taken before this.
    not_before: datetime | None = None
    #: Attempts that were retries; ``attempt - 1 - retries`` were crash recoveries.
    retries: int = 0
    #: The run this queued run waits for under ``max_active_runs``.
    waiting_for: str | None = None
    #: Why the current attempt exists, past the first: ``retry of attempt 2 (…)``.
    attempt_reason: str | None = None

    @property
    def recoveries(self) -> int:
        """Attempts that followed a crash or an interruption's expired lease."""
        return max(self.attempt - 1 - self.retries, 0)

    def as_dict(self) -> dict[str, Any]:
        """The run in the documented JSON shape (API, webhooks, ``--json``): no lease internals
        beyond what operators need."""
        return {
            "id": self.id,
            "pipeline": self.pipeline,
            "status": self.status.value,
            "attempt": self.attempt,
            "params": self.params,
            "gateway": self.gateway,
            "lease_owner": self.lease_owner,
            "lease_epoch": self.lease_epoch,
            "checkpoint": self.checkpoint,
            "telemetry_summary": self.telemetry_summary,
            "error_summary": self.error_summary,
            "cancel_requested": self.cancel_requested,
            "created_at": self.created_at.isoformat(),
            "started_at": self.started_at.isoformat() if self.started_at else None,
            "finished_at": self.finished_at.isoformat() if self.finished_at else None,
            "trigger": self.trigger,
            "triggered_by": self.triggered_by,
            "fire_time": _iso(self.fire_time),
            "interval_start": _iso(self.interval_start),
            "interval_end": _iso(self.interval_end),
            "not_before": _iso(self.not_before),
            "retries": self.retries,
            "recoveries": self.recoveries,
            "waiting_for": self.waiting_for,
            "attempt_reason": self.attempt_reason,
        }


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


class Trigger(enum.StrEnum):
    """How a run started."""

    MANUAL = "manual"
    SCHEDULE = "schedule"
    BACKFILL = "backfill"


@dataclass(frozen=True, slots=True)
class Lease:
    """Proof of ownership of a run: every fenced write names its epoch."""

    run_id: str
    owner: str
    epoch: int
    attempt: int
    expires_at: float


@dataclass(slots=True)
class NewEntry:
    """A log entry not yet stored (the store assigns its id)."""

    run_id: str
    level: Level
    event: str
    message: str
    occurred_at: datetime
    data: dict[str, Any] = field(default_factory=dict)
    worker_id: str | None = None
    attempt: int | None = None
    #: Epoch of the lease the writer held, or None for writers that hold none (API, watchdog).
    epoch: int | None = None


@dataclass(frozen=True, slots=True)
class Entry:
    """A stored log entry; ``id`` grows monotonically and is the cursor everywhere."""

    id: int
    run_id: str
    level: Level
    event: str
    message: str
    data: dict[str, Any]
    worker_id: str | None
    attempt: int | None
    occurred_at: datetime

    def as_dict(self) -> dict[str, Any]:
        """The entry in the documented JSON shape."""
        return {
            "id": self.id,
            "run_id": self.run_id,
            "level": self.level.value,
            "event": self.event,
            "message": self.message,
            "data": self.data,
            "worker_id": self.worker_id,
            "attempt": self.attempt,
            "occurred_at": self.occurred_at.isoformat().replace("+00:00", "Z"),
        }
