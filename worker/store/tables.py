"""The run-log store's tables (SQLAlchemy Core); Alembic migrations create them."""

from __future__ import annotations

import secrets
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Identity,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB

from worker.models import Run, Status
from worker.store.engine import aware, utcnow

#: The page filter for each minimum level, verbatim as the partial indexes' predicates
#: (SQLite uses a partial index only for a query term identical to its predicate).
LEVEL_FILTERS = {"warning": "level IN ('warning', 'error')", "error": "level = 'error'"}

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

#: JSON everywhere, JSONB on PostgreSQL (indexable, compact).
Json = JSON().with_variant(JSONB(), "postgresql")
#: 64-bit ids on PostgreSQL; SQLite only autoincrements an INTEGER PRIMARY KEY.
EntryId = BigInteger().with_variant(Integer(), "sqlite")
Timestamp = DateTime(timezone=True)

runs = Table(
    "runs",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("pipeline", String(200), nullable=False),
    Column("status", String(20), nullable=False),
    Column("attempt", Integer, nullable=False, default=1),
    Column("params", Json, nullable=False),
    Column("gateway", String(200), nullable=True),
    Column("lease_owner", String(200), nullable=True),
    # The fencing token: only ever grows, bumped by every acquire.
    Column("lease_epoch", Integer, nullable=False, default=0),
    # Seconds since the epoch on the database clock, so that no worker's clock matters.
    Column("lease_expires_at", Float, nullable=True),
    Column("heartbeat_at", Timestamp, nullable=True),
    Column("checkpoint", Json, nullable=False),
    Column("telemetry_summary", Json, nullable=False),
    Column("error_summary", Text, nullable=True),
    Column("cancel_requested", Boolean, nullable=False, default=False),
    # Info and debug entries stored, against the per-run cap; and how many the cap dropped.
    Column("entry_count", Integer, nullable=False, server_default="0"),
    Column("entries_dropped", Integer, nullable=False, server_default="0"),
    Column("created_at", Timestamp, nullable=False),
    Column("queued_at", Timestamp, nullable=False),
    Column("started_at", Timestamp, nullable=True),
    Column("finished_at", Timestamp, nullable=True),
    Column("updated_at", Timestamp, nullable=False),
    # How the run started (migration 0007): manual, schedule or backfill, and by whom.
    Column("trigger", String(20), nullable=False, server_default="manual"),
    Column("triggered_by", String(200), nullable=True),
    # A scheduled or backfilled run's fire time: unique per pipeline (exactly once).
    Column("fire_time", Timestamp, nullable=True),
    Column("interval_start", Timestamp, nullable=True),
    Column("interval_end", Timestamp, nullable=True),
    # A run waiting for its retry is not taken before this.
    Column("not_before", Timestamp, nullable=True),
    # Attempts that were retries (the rest of attempt - 1 were crash recoveries).
    Column("retries", Integer, nullable=False, server_default="0"),
    # The run a queued run waits for under max_active_runs.
    Column("waiting_for", String(64), nullable=True),
    # Why the current attempt exists, past the first: "retry of attempt 2", "recovery of …".
    Column("attempt_reason", String(300), nullable=True),
    # Ended by someone else than its worker: the watchdog removes what its write modes must
    # not leave (migration 0012).
    Column("cleanup_owed", Boolean, nullable=False, server_default=text("false")),
    Index("ix_runs_status_queued_at", "status", "queued_at"),
    Index(
        "ix_runs_cleanup_owed",
        "finished_at",
        postgresql_where=text("cleanup_owed"),
        sqlite_where=text("cleanup_owed"),
    ),
    Index("uq_runs_pipeline_fire_time", "pipeline", "fire_time", unique=True),
    Index(
        "ix_runs_not_before",
        "not_before",
        postgresql_where=text("not_before IS NOT NULL"),
        sqlite_where=text("not_before IS NOT NULL"),
    ),
    Index("ix_runs_pipeline_status", "pipeline", "status"),
    Index("ix_runs_pipeline_created_at", "pipeline", "created_at"),
    # A gateway's queue in claim order (migration 0006).
    Index("ix_runs_gateway_status_created_at", "gateway", "status", "created_at", "id"),
    # The runs list's newest-first pages (migration 0010).
    Index("ix_runs_created_at_id", "created_at", "id"),
)

log_entries = Table(
    "log_entries",
    metadata,
    Column("id", EntryId, Identity(always=False), primary_key=True, autoincrement=True),
    Column("run_id", String(64), ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
    Column("level", String(10), nullable=False),
    Column("event", String(64), nullable=False),
    Column("message", Text, nullable=False),
    Column("data", Json, nullable=False),
    Column("worker_id", String(200), nullable=True),
    Column("attempt", Integer, nullable=True),
    Column("occurred_at", Timestamp, nullable=False),
    Index("ix_log_entries_run_id_id", "run_id", "id"),
    Index("ix_log_entries_occurred_at", "occurred_at"),
    # The flat view's filters, in page order (migration 0006).
    Index("ix_log_entries_event_id", "event", "id"),
    Index("ix_log_entries_worker_id_id", "worker_id", "id"),
    # A run's lifecycle entries (its attempt history) without walking the run (migration 0010).
    Index("ix_log_entries_run_id_event_id", "run_id", "event", "id"),
    # Severity pages (migration 0005): the predicates are the store's page filters, verbatim.
    *(
        Index(
            f"ix_log_entries_run_id_id_{level}",
            "run_id",
            "id",
            postgresql_where=text(predicate),
            sqlite_where=text(predicate),
        )
        for level, predicate in LEVEL_FILTERS.items()
    ),
    sqlite_autoincrement=True,
)

telemetry_samples = Table(
    "telemetry_samples",
    metadata,
    Column("id", EntryId, Identity(always=False), primary_key=True, autoincrement=True),
    Column("run_id", String(64), ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
    Column("at", Timestamp, nullable=False),
    Column("values", Json, nullable=False),
    Index("ix_telemetry_samples_run_id_at", "run_id", "at"),
    sqlite_autoincrement=True,
)

api_tokens = Table(
    "api_tokens",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("name", String(200), nullable=False),
    # operator | read | gateway:NAME
    Column("scope", String(220), nullable=False),
    # SHA-256 of the secret: a leaked table does not leak usable tokens.
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("created_at", Timestamp, nullable=False),
    Column("revoked_at", Timestamp, nullable=True),
    Column("last_used_at", Timestamp, nullable=True),
)

console_sessions = Table(
    "console_sessions",
    metadata,
    # SHA-256 of the cookie's secret: a leaked table does not leak usable sessions.
    Column("id", String(64), primary_key=True),
    Column(
        "token_id",
        String(32),
        ForeignKey("api_tokens.id", ondelete="CASCADE"),
        nullable=False,
        index=True,
    ),
    # The per-session CSRF secret every state-changing form and request echoes.
    Column("csrf", String(64), nullable=False),
    Column("created_at", Timestamp, nullable=False),
    Column("expires_at", Timestamp, nullable=False),
)

pipeline_state = Table(
    "pipeline_state",
    metadata,
    Column("pipeline", String(200), primary_key=True),
    Column("paused", Boolean, nullable=False, server_default=text("false")),
    Column("paused_by", String(200), nullable=True),
    Column("paused_at", Timestamp, nullable=True),
    # The schedule (expression and zone) the clock below belongs to: a new one restarts it.
    Column("schedule_key", String(300), nullable=True),
    # Fire times after this are due (set when the schedule is first seen or resumed).
    Column("anchor", Timestamp, nullable=True),
    Column("last_fire", Timestamp, nullable=True),
    Column("updated_at", Timestamp, nullable=False),
)

#: Durable counters per pipeline (migration 0009), raised in the transaction that makes the
#: change they count: ``name`` is the counter, ``labels`` its other label values
#: (``status=failed``, ``status=succeeded,le=300``), never a run id.
pipeline_metrics = Table(
    "pipeline_metrics",
    metadata,
    Column("pipeline", String(200), primary_key=True),
    Column("name", String(64), primary_key=True),
    Column("labels", String(200), primary_key=True),
    Column("value", Float, nullable=False),
)

webhook_deliveries = Table(
    "webhook_deliveries",
    metadata,
    Column("id", EntryId, Identity(always=False), primary_key=True, autoincrement=True),
    Column("run_id", String(64), ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
    Column("url", Text, nullable=False),
    # pending | delivered | failed
    Column("status", String(20), nullable=False),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("last_error", Text, nullable=True),
    Column("created_at", Timestamp, nullable=False),
    Column("delivered_at", Timestamp, nullable=True),
    Index("ix_webhook_deliveries_run_id", "run_id"),
    sqlite_autoincrement=True,
)


def new_run_id() -> str:
    """A fresh, unguessable run id."""
    return f"run_{secrets.token_hex(8)}"


def queued_run(
    pipeline: str, params: dict[str, Any] | None, now: Any, **fields: Any
) -> dict[str, Any]:
    """The ``runs`` row of a new ``queued`` run; ``fields`` sets the rest (gateway, how it
    started, its data interval)."""
    return {
        "id": new_run_id(),
        "pipeline": pipeline,
        "status": Status.QUEUED.value,
        "attempt": 1,
        "params": params or {},
        "gateway": None,
        "lease_epoch": 0,
        "checkpoint": {},
        "telemetry_summary": {},
        "cancel_requested": False,
        "created_at": now,
        "queued_at": now,
        "updated_at": now,
        "retries": 0,
        **fields,
    }


def run_from_row(row: Any) -> Run:
    """A ``runs`` row as the :class:`Run` record."""
    return Run(
        id=row.id,
        pipeline=row.pipeline,
        status=Status(row.status),
        attempt=row.attempt,
        params=row.params or {},
        gateway=row.gateway,
        lease_owner=row.lease_owner,
        lease_epoch=row.lease_epoch,
        lease_expires_at=row.lease_expires_at,
        heartbeat_at=aware(row.heartbeat_at),
        checkpoint=row.checkpoint or {},
        telemetry_summary=row.telemetry_summary or {},
        error_summary=row.error_summary,
        cancel_requested=bool(row.cancel_requested),
        created_at=aware(row.created_at) or utcnow(),
        queued_at=aware(row.queued_at) or utcnow(),
        started_at=aware(row.started_at),
        finished_at=aware(row.finished_at),
        updated_at=aware(row.updated_at) or utcnow(),
        trigger=row.trigger,
        triggered_by=row.triggered_by,
        fire_time=aware(row.fire_time),
        interval_start=aware(row.interval_start),
        interval_end=aware(row.interval_end),
        not_before=aware(row.not_before),
        retries=row.retries,
        waiting_for=row.waiting_for,
        attempt_reason=row.attempt_reason,
    )
