"""indexes for a gateway's queue and the flat view's filters

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-27 11:00:00

A gateway polls for its queued runs: (gateway, status, created_at, id) finds
them in order however many queued runs other gateways have. The flat view
pages by id under an ``event`` or ``worker_id`` filter; without an index on
(filter, id) a filter that matches nothing walked the whole entry table.
"""

from __future__ import annotations

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        "ix_runs_gateway_status_created_at", "runs", ["gateway", "status", "created_at", "id"]
    )
    op.create_index("ix_log_entries_event_id", "log_entries", ["event", "id"])
    op.create_index("ix_log_entries_worker_id_id", "log_entries", ["worker_id", "id"])


def downgrade() -> None:
    op.drop_index("ix_log_entries_worker_id_id", table_name="log_entries")
    op.drop_index("ix_log_entries_event_id", table_name="log_entries")
    op.drop_index("ix_runs_gateway_status_created_at", table_name="runs")
