"""partial indexes for the warning and error pages of a run

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23 15:10:00

A ``level=warning`` page walked the (run_id, id) index and skipped the nine in
ten entries that are info: 2-3 ms more than a first page on 1000 results. Each
partial index holds only the entries its filter selects, in page order, so a
severity page reads as few rows as a plain one. The predicates are the exact
text the store's page query uses (SQLite proves a partial index usable only
from an identical term). Writes pay only for warnings and errors.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

WARNING = "level IN ('warning', 'error')"
ERROR = "level = 'error'"


def upgrade() -> None:
    for name, predicate in (
        ("ix_log_entries_run_id_id_warning", WARNING),
        ("ix_log_entries_run_id_id_error", ERROR),
    ):
        op.create_index(
            name,
            "log_entries",
            ["run_id", "id"],
            postgresql_where=sa.text(predicate),
            sqlite_where=sa.text(predicate),
        )


def downgrade() -> None:
    op.drop_index("ix_log_entries_run_id_id_error", table_name="log_entries")
    op.drop_index("ix_log_entries_run_id_id_warning", table_name="log_entries")
