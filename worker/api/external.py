"""External runners (gateways, CI jobs): the runs PATCH contract, under the same lease rules.

A runner claims a queued run with ``status: "running"`` and gets the lease
epoch back; every later PATCH names that epoch (``leaseEpoch``), renews the
lease and is fenced on it exactly like a Celery worker's writes, so a runner
whose lease expired and was recovered writes nothing more. It finishes with a
terminal ``status``. An ended run still takes backfills (telemetry, error
summary, finish time, a replaced log).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from worker.errors import IllegalTransition, LeaseLost, QuarryError
from worker.limits import MAX_INT32, BoundedJson, check_json, client_time
from worker.models import Event, Lease, Level, NewEntry, Run, Status
from worker.runlog import truncate
from worker.scrub import scrubber
from worker.settings import Settings
from worker.store import Store
from worker.store.external import ExternalChange
from worker.telemetry import check_summary

#: The event of a free-form line appended by an external runner.
LOG_EVENT = "log"
#: Most entries one ``logEntries`` replacement may carry.
MAX_REPLACED_ENTRIES = 10_000
#: Event names only the runtime writes: a runner reporting ``run_completed`` would end
#: every live stream of a run that goes on.
RESERVED_EVENTS = frozenset(event.value for event in Event)


def _alias(camel: str, snake: str) -> Any:
    return Field(default=None, validation_alias=AliasChoices(camel, snake))


class LogLine(BaseModel):
    """One line an external runner reports."""

    model_config = ConfigDict(extra="forbid")

    level: Literal["debug", "info", "warn", "warning", "error"] = "info"
    message: str = Field(max_length=1024 * 1024)
    at: datetime | None = None
    event: str = Field(default=LOG_EVENT, min_length=1, max_length=64)
    data: BoundedJson = Field(default_factory=dict)

    @field_validator("event")
    @classmethod
    def _event(cls, value: str) -> str:
        if value in RESERVED_EVENTS:
            msg = f"{value!r} is a lifecycle event only Quarry's runtime writes"
            raise ValueError(msg)
        return value


class Sample(BaseModel):
    """A telemetry point: ``at`` (optional) and any JSON values."""

    model_config = ConfigDict(extra="allow")

    at: datetime | None = None

    @model_validator(mode="after")
    def _bounded(self) -> Sample:
        check_json(self.model_extra or {}, "sample")
        return self

    def values(self) -> dict[str, Any]:
        """The point's values."""
        return dict(self.model_extra or {})


class RunPatch(BaseModel):
    """``PATCH /api/v1/action-runs/{id}``: camelCase as documented, snake_case too."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    #: Claim (``running``) or end the runner's tenure; ``queued`` is the runtime's alone.
    status: Literal["running", "succeeded", "failed", "cancelled", "interrupted"] | None = None
    lease_epoch: int | None = Field(
        default=None,
        validation_alias=AliasChoices("leaseEpoch", "lease_epoch"),
        ge=0,
        le=MAX_INT32,
    )
    append_log: LogLine | None = _alias("appendLog", "append_log")
    log_entries: list[LogLine] | None = Field(
        default=None,
        validation_alias=AliasChoices("logEntries", "log_entries"),
        max_length=MAX_REPLACED_ENTRIES,
    )
    telemetry_summary: BoundedJson | None = _alias("telemetrySummary", "telemetry_summary")
    append_telemetry_sample: Sample | None = _alias(
        "appendTelemetrySample", "append_telemetry_sample"
    )
    telemetry_samples: list[Sample] | None = Field(
        default=None,
        validation_alias=AliasChoices("telemetrySamples", "telemetry_samples"),
        max_length=2000,
    )
    error_summary: str | None = Field(
        default=None,
        validation_alias=AliasChoices("errorSummary", "error_summary"),
        max_length=10_000,
    )
    finished_at: datetime | None = _alias("finishedAt", "finished_at")

    @property
    def target(self) -> Status | None:
        """The status this PATCH sets, if any."""
        return Status(self.status) if self.status is not None else None

    @field_validator("telemetry_summary")
    @classmethod
    def _summary(cls, value: dict[str, Any] | None, _info: ValidationInfo) -> Any:
        return None if value is None else check_summary(value)


class PatchRefused(QuarryError):
    """The PATCH cannot apply to the run as it is (409)."""


def _entry(run: Run, line: LogLine, owner: str, settings: Settings, field: str) -> NewEntry:
    at = client_time(line.at, f"{field}.at", not_before=run.created_at) if line.at else None
    return NewEntry(
        run_id=run.id,
        level=Level.parse(line.level),
        event=line.event,
        message=truncate(scrubber.text(line.message), settings.max_message_bytes),
        occurred_at=at or datetime.now(UTC),
        data=scrubber.data(line.data),
        worker_id=owner,
        attempt=run.attempt,
    )


def apply_patch(
    store: Store, settings: Settings, run: Run, patch: RunPatch, owner: str
) -> dict[str, Any]:
    """Apply ``patch`` to ``run`` as ``owner``, all of it or nothing; returns extra fields.

    Only runs targeted at a gateway take PATCHes: a run without one belongs to
    Quarry's workers, and a report about it could only contradict them.
    """
    if run.gateway is None:
        msg = (
            f"run {run.id} is executed by Quarry's workers: only runs targeted at a gateway "
            "take PATCH reports"
        )
        raise PatchRefused(msg)
    if patch.target is Status.RUNNING:
        if patch.model_fields_set - {"status"}:
            # A claim is its own transaction: what comes with it could not be all-or-nothing.
            msg = 'status "running" claims the run: send the rest in the PATCHes after it'
            raise PatchRefused(msg)
        return {"leaseEpoch": _claim(store, settings, run, owner).epoch}
    lease = _lease_for(run, patch)
    change = ExternalChange(
        status=patch.target if lease is not None else None,
        error_summary=(
            scrubber.text(patch.error_summary) if patch.error_summary is not None else None
        ),
    )
    if patch.finished_at is not None:
        start = run.started_at or run.created_at
        change.finished_at = client_time(patch.finished_at, "finishedAt", not_before=start)
    if patch.telemetry_summary is not None:
        change.summary = {**run.telemetry_summary, **scrubber.data(patch.telemetry_summary)}
    if patch.append_log is not None:
        if lease is None:
            msg = f"run {run.id} has ended ({run.status.value}): replace its log with logEntries"
            raise PatchRefused(msg)
        change.entries.append(_entry(run, patch.append_log, owner, settings, "appendLog"))
    if patch.log_entries is not None:
        change.log = [
            _entry(run, line, owner, settings, f"logEntries[{i}]")
            for i, line in enumerate(patch.log_entries)
        ]
    if patch.telemetry_samples is not None:
        change.samples = [
            (_sample_time(run, s, f"telemetrySamples[{i}]"), scrubber.data(s.values()))
            for i, s in enumerate(patch.telemetry_samples)
        ]
    if patch.append_telemetry_sample is not None:
        point = patch.append_telemetry_sample
        at = _sample_time(run, point, "appendTelemetrySample")
        change.sample = (at, scrubber.data(point.values()))
    if change.status is not None:
        change.entries.append(_ended(run, change.status, owner))
    store.write_external(
        run.id,
        lease,
        change,
        ttl_seconds=settings.lease_ttl_seconds,
        sample_cap=settings.telemetry_max_samples,
    )
    return {}


def _sample_time(run: Run, sample: Sample, field: str) -> datetime | None:
    if sample.at is None:
        return None
    return client_time(sample.at, f"{field}.at", not_before=run.created_at)


def _claim(store: Store, settings: Settings, run: Run, owner: str) -> Lease:
    """Take the lease on a queued run."""
    if run.status is not Status.QUEUED:
        msg = f"cannot claim run {run.id}: it is {run.status.value}, not queued"
        raise IllegalTransition(msg)
    lease = store.acquire(run.id, owner, settings.lease_ttl_seconds, _claimed(run, owner))
    if not isinstance(lease, Lease):  # no limit is asked for: never Waiting
        msg = f"run {run.id} was claimed by someone else"
        raise PatchRefused(msg)
    return lease


def _lease_for(run: Run, patch: RunPatch) -> Lease | None:
    """The caller's lease on a running run (checked when written), or None for an ended run."""
    if run.status is Status.RUNNING:
        if patch.lease_epoch is None:
            msg = "leaseEpoch: required to write to a running run (the epoch the claim returned)"
            raise PatchRefused(msg)
        return Lease(run.id, run.lease_owner or "", patch.lease_epoch, run.attempt, 0.0)
    if patch.lease_epoch is not None:
        # The caller still thinks it holds the run: it was recovered or finished meanwhile.
        raise LeaseLost(f"{run.id} epoch {patch.lease_epoch}")
    if run.status is Status.QUEUED:
        msg = f'run {run.id} is queued: claim it first with status "running"'
        raise PatchRefused(msg)
    if patch.target is not None and patch.target is not run.status:
        msg = f"{run.status.value} -> {patch.target.value}"
        raise IllegalTransition(msg)
    return None


def _claimed(run: Run, owner: str) -> Any:
    def entries(lease: Lease) -> list[NewEntry]:
        return [
            NewEntry(
                run_id=run.id,
                level=Level.INFO,
                event=Event.LEASE_ACQUIRED.value,
                message=f"External runner {owner} took ownership (attempt {lease.attempt})",
                occurred_at=datetime.now(UTC),
                data={"lease_epoch": lease.epoch, "external": True},
                worker_id=owner,
                attempt=lease.attempt,
            )
        ]

    return entries


def _ended(run: Run, status: Status, owner: str) -> NewEntry:
    event, level = {
        Status.SUCCEEDED: (Event.RUN_COMPLETED, Level.INFO),
        Status.FAILED: (Event.RUN_FAILED, Level.ERROR),
        Status.CANCELLED: (Event.RUN_CANCELLED, Level.WARNING),
        Status.INTERRUPTED: (Event.RUN_INTERRUPTED, Level.WARNING),
    }[status]
    return NewEntry(
        run_id=run.id,
        level=level,
        event=event.value,
        message=f"External runner {owner} reported {status.value}",
        occurred_at=datetime.now(UTC),
        worker_id=owner,
        attempt=run.attempt,
    )


__all__ = ["LeaseLost", "PatchRefused", "RunPatch", "apply_patch"]
