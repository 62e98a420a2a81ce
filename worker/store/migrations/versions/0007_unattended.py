"""how runs start (trigger, fire time, data interval), retries, waiting runs, pipeline state

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-27 13:00:00

A scheduled run carries its fire time; the unique (pipeline, fire_time) index
is what makes a fire time create one run however many beats tick. A run waiting
for its retry carries ``not_before``; a run held back by ``max_active_runs``
names the run it waits for. Pause state lives in ``pipeline_state``, beside the
schedule's clock (its anchor and last fire time).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.add_column(
            sa.Column("trigger", sa.String(20), nullable=False, server_default="manual")
        )
        batch.add_column(sa.Column("triggered_by", sa.String(200), nullable=True))
        batch.add_column(sa.Column("fire_time", _TS, nullable=True))
        batch.add_column(sa.Column("interval_start", _TS, nullable=True))
        batch.add_column(sa.Column("interval_end", _TS, nullable=True))
        batch.add_column(sa.Column("not_before", _TS, nullable=True))
        batch.add_column(sa.Column("retries", sa.Integer, nullable=False, server_default="0"))
        batch.add_column(sa.Column("waiting_for", sa.String(64), nullable=True))
        batch.add_column(sa.Column("attempt_reason", sa.String(300), nullable=True))
    op.create_index("uq_runs_pipeline_fire_time", "runs", ["pipeline", "fire_time"], unique=True)
    op.create_index(
        "ix_runs_not_before",
        "runs",
        ["not_before"],
        postgresql_where=sa.text("not_before IS NOT NULL"),
        sqlite_where=sa.text("not_before IS NOT NULL"),
    )
    op.create_index("ix_runs_pipeline_status", "runs", ["pipeline", "status"])
    op.create_table(
        "pipeline_state",
        sa.Column("pipeline", sa.String(200), primary_key=True),
        sa.Column("paused", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("paused_by", sa.String(200), nullable=True),
        sa.Column("paused_at", _TS, nullable=True),
        sa.Column("schedule_key", sa.String(300), nullable=True),
        sa.Column("anchor", _TS, nullable=True),
        sa.Column("last_fire", _TS, nullable=True),
        sa.Column("updated_at", _TS, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("pipeline_state")
    op.drop_index("ix_runs_pipeline_status", table_name="runs")
    op.drop_index("ix_runs_not_before", table_name="runs")
    op.drop_index("uq_runs_pipeline_fire_time", table_name="runs")
    with op.batch_alter_table("runs") as batch:
        for name in (
            "attempt_reason",
            "waiting_for",
            "retries",
            "not_before",
            "interval_end",
            "interval_start",
            "fire_time",
            "triggered_by",
            "trigger",
        ):
            batch.drop_column(name)
