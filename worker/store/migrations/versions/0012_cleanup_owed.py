"""runs ended without their worker owe their write-mode cleanup

Revision ID: 0012
Revises: 0011
Create Date: 2026-11-28 03:00:00

A run its own worker ends removes what its write modes must not leave (an
``append`` run's rows with ``on_failure = "remove"``, a ``replace`` staging
table). A run ended by someone else (a forced cancel of a worker stuck in a
call, the watchdog's cancel of a dead worker's run, a run past its timeout
whose process is ended) is marked here, and the watchdog's sweep does it.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.add_column(
            sa.Column("cleanup_owed", sa.Boolean, nullable=False, server_default=sa.false())
        )
    op.create_index(
        "ix_runs_cleanup_owed",
        "runs",
        ["finished_at"],
        postgresql_where=sa.text("cleanup_owed"),
        sqlite_where=sa.text("cleanup_owed"),
    )


def downgrade() -> None:
    op.drop_index("ix_runs_cleanup_owed", table_name="runs")
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("cleanup_owed")
