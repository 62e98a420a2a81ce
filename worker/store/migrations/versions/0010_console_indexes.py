"""indexes for the runs table's newest-first pages and a run's attempt history

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-27 17:30:00

The runs list with no filter sorted the whole table (no index served
``created_at DESC, id DESC``); the console and the API read its first page on
every refresh. A run's attempt history (its lease and ending entries) walked
every entry of the run through (run_id, id): 200,000 entries to return a few.
"""

from __future__ import annotations

from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_runs_created_at_id", "runs", ["created_at", "id"])
    op.create_index("ix_log_entries_run_id_event_id", "log_entries", ["run_id", "event", "id"])


def downgrade() -> None:
    op.drop_index("ix_log_entries_run_id_event_id", table_name="log_entries")
    op.drop_index("ix_runs_created_at_id", table_name="runs")
