"""pipeline metrics: durable counters per pipeline

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-27 16:30:00

The API process serves ``/metrics`` while the runs happen in worker processes, so
run-level counters cannot live in any one process's memory. Each row is one
monotonic counter (or a histogram bucket, sum, or the last success time) of one
pipeline, raised in the transaction that makes the change it counts.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "pipeline_metrics",
        sa.Column("pipeline", sa.String(200), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("labels", sa.String(200), nullable=False),
        sa.Column("value", sa.Float, nullable=False),
        sa.PrimaryKeyConstraint("pipeline", "name", "labels", name=op.f("pk_pipeline_metrics")),
    )


def downgrade() -> None:
    op.drop_table("pipeline_metrics")
