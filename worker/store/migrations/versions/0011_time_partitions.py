"""entries and samples partitioned by day on PostgreSQL

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-28 02:30:00

Retention deleted old entries row by row: at hundreds of millions of entries,
the heaviest write load on the database. Partitioned by day, retention drops
whole days (:mod:`worker.store.partitions`). Every row is copied into the
partitioned tables with its id; the id sequences go on where they were. SQLite
keeps its plain tables and batched deletes.
"""

from __future__ import annotations

from datetime import UTC, datetime

from alembic import op

from worker.store import partitions

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    conn = op.get_bind()
    if conn.dialect.name != "postgresql":
        return
    today = datetime.now(UTC).date()
    for table in partitions.PARTITIONED:
        partitions.convert(conn, table, today)


def downgrade() -> None:
    conn = op.get_bind()
    if conn.dialect.name != "postgresql":
        return
    for table in partitions.PARTITIONED:
        partitions.unconvert(conn, table)
