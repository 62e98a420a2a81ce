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
from typing import Any

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator

from worker.errors import IllegalTransition, LeaseLost, QuarryError
from worker.models import Event, Lease, Level, NewEntry, Run, Status
from worker.runlog import truncate
from worker.scrub import scrubber
from worker.settings import Settings
from worker.store import Store

#: The event of a free-form line appended by an external runner.
LOG_EVENT = "log"
#: Most entries one ``logEntries`` replacement may carry.
MAX_REPLACED_ENTRIES = 10_000


def _alias(camel: str, snake: str) -> Any:
    return Field(default=None, validation_alias=AliasChoices(camel, snake))


class LogLine(BaseModel):
    """One line an external runner reports."""

    model_config = ConfigDict(extra="forbid")

    level: str = "info"
    message: str = Field(max_length=1024 * 1024)
    at: datetime | None = None
    event: str = Field(default=LOG_EVENT, max_length=64)
    data: dict[str, Any] = Field(default_factory=dict)

    @field_validator("level")
    @classmethod
    def _level(cls, value: str) -> str:
        return Level.parse(value).value


class Sample(BaseModel):
    """A telemetry point: ``at`` (optional) and any numeric values."""

    model_config = ConfigDict(extra="allow")

    at: datetime | None = None

    def values(self) -> dict[str, Any]:
        """The point's values."""
        return dict(self.model_extra or {})


class RunPatch(BaseModel):
    """``PATCH /api/v1/action-runs/{id}``: camelCase as documented, snake_case too."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    status: Status | None = None
    lease_epoch: int | None = _alias("leaseEpoch", "lease_epoch")
    append_log: LogLine | None = _alias("appendLog", "append_log")
    log_entries: list[LogLine] | None = Field(
        default=None,
        validation_alias=AliasChoices("logEntries", "log_entries"),
        max_length=MAX_REPLACED_ENTRIES,
    )
    telemetry_summary: dict[str, Any] | None = _alias("telemetrySummary", "telemetry_summary")
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


class PatchRefused(QuarryError):
    """The PATCH cannot apply to the run as it is (409)."""


def _entry(run: Run, line: LogLine, owner: str, settings: Settings) -> NewEntry:
    return NewEntry(
        run_id=run.id,
        level=Level(line.level),
        event=line.event,
        message=truncate(scrubber.text(line.message), settings.max_message_bytes),
        occurred_at=line.at or datetime.now(UTC),
        data=scrubber.data(line.data),
        worker_id=owner,
        attempt=run.attempt,
    )


def apply_patch(
    store: Store, settings: Settings, run: Run, patch: RunPatch, owner: str
) -> dict[str, Any]:
    """Apply ``patch`` to ``run`` as ``owner``; returns extra response fields (the lease)."""
    run, lease = _lease_for(store, settings, run, patch, owner)
    extra: dict[str, Any] = (
        {"leaseEpoch": lease.epoch} if patch.status is Status.RUNNING and lease else {}
    )
    summary = None
    if patch.telemetry_summary is not None:
        summary = {**run.telemetry_summary, **scrubber.data(patch.telemetry_summary)}
    entries = [_entry(run, patch.append_log, owner, settings)] if patch.append_log else []
    error = scrubber.text(patch.error_summary) if patch.error_summary is not None else None
    _replace_series(store, settings, run, patch, owner=owner, lease=lease)

    if lease is not None:
        target = patch.status if patch.status not in {None, Status.RUNNING} else None
        if target is not None:
            ended = [*entries, _ended(run, target, owner)]
            store.finish(lease, target, ended, error_summary=error, summary=summary)
            if patch.finished_at is not None:
                store.amend_ended(run.id, finished_at=patch.finished_at)
        elif entries or summary is not None:
            store.commit(lease, entries, summary=summary)
        return extra
    # An ended run: backfills only.
    if patch.status is not None and patch.status is not run.status:
        msg = f"{run.status.value} -> {patch.status.value}"
        raise IllegalTransition(msg)
    if entries:
        msg = f"run {run.id} has ended ({run.status.value}): replace its log with logEntries"
        raise PatchRefused(msg)
    store.amend_ended(run.id, error_summary=error, finished_at=patch.finished_at, summary=summary)
    return extra


def _lease_for(
    store: Store, settings: Settings, run: Run, patch: RunPatch, owner: str
) -> tuple[Run, Lease | None]:
    """Claim a queued run, or check and renew the caller's lease on a running one."""
    if patch.status is Status.RUNNING:
        if run.status is not Status.QUEUED:
            msg = f"cannot claim run {run.id}: it is {run.status.value}, not queued"
            raise IllegalTransition(msg)
        lease = store.acquire(run.id, owner, settings.lease_ttl_seconds, _claimed(run, owner))
        if lease is None:
            msg = f"run {run.id} was claimed by someone else"
            raise PatchRefused(msg)
        return store.get_run(run.id), lease
    if run.status is Status.RUNNING:
        if patch.lease_epoch is None:
            msg = "leaseEpoch: required to write to a running run (the epoch the claim returned)"
            raise PatchRefused(msg)
        lease = Lease(run.id, owner, patch.lease_epoch, run.attempt, 0.0)
        store.renew(lease, settings.lease_ttl_seconds)  # LeaseLost if it is not theirs
        return run, lease
    if patch.lease_epoch is not None:
        # The caller still thinks it holds the run: it was recovered or finished meanwhile.
        raise LeaseLost(f"{run.id} epoch {patch.lease_epoch}")
    if run.status is Status.QUEUED:
        msg = f'run {run.id} is queued: claim it first with status "running"'
        raise PatchRefused(msg)
    return run, None


def _replace_series(
    store: Store, settings: Settings, run: Run, patch: RunPatch, *, owner: str, lease: Lease | None
) -> None:
    """Whole-log and whole-series replacements, and one appended sample."""
    if patch.log_entries is not None:
        replaced = [_entry(run, line, owner, settings) for line in patch.log_entries]
        store.replace_entries(run.id, replaced, lease)
    if patch.telemetry_samples is not None:
        store.replace_samples(
            run.id, [(s.at, scrubber.data(s.values())) for s in patch.telemetry_samples]
        )
    if patch.append_telemetry_sample is not None:
        point = patch.append_telemetry_sample
        store.append_sample(
            run.id, scrubber.data(point.values()), at=point.at, cap=settings.telemetry_max_samples
        )


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
