"""Time partitions of the entries and samples tables on PostgreSQL.

``log_entries`` (by ``occurred_at``) and ``telemetry_samples`` (by ``at``) are
partitioned by range, one partition per UTC day named ``<table>_pYYYYMMDD``,
plus ``<table>_default`` for any row outside every day's partition (a worker
whose clock is days off, a day that maintenance has not created yet). Retention
drops whole days instead of deleting rows; the default partition alone is
cleaned row by row, and is normally empty.

Maintenance creates the days ahead (:data:`DAYS_AHEAD`). A day created after
rows for it landed in the default partition takes them over in the same
transaction, so no row is ever outside the partition its time belongs to for
longer than a maintenance period, and none is lost.

DDL on a partitioned table locks its parent. Every step runs in its own short
transaction under :data:`LOCK_TIMEOUT`: a step that cannot get its lock (a long
reader) gives up without holding writers back, and the next maintenance retries.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from datetime import UTC, date, datetime, time, timedelta
from typing import NamedTuple

import psycopg.errors
from sqlalchemy import Connection, text

_log = logging.getLogger(__name__)

#: The partitioned tables and the time column each is partitioned by.
PARTITIONED: dict[str, str] = {"log_entries": "occurred_at", "telemetry_samples": "at"}
#: Days created ahead of today by maintenance (and by the migration).
DAYS_AHEAD = 3
#: The longest a partition step waits for its lock on the parent before giving up.
LOCK_TIMEOUT = "2s"
#: A migration gives existing rows older than this many days to the default partition
#: instead of a day each (retention then deletes them row by row).
MAX_BACKFILL_DAYS = 400


def day_name(table: str, day: date) -> str:
    """The partition of ``table`` holding ``day`` (UTC)."""
    return f"{table}_p{day:%Y%m%d}"


def default_name(table: str) -> str:
    """The partition of ``table`` for rows outside every day's partition."""
    return f"{table}_default"


def day_bounds(day: date) -> tuple[datetime, datetime]:
    """The half-open UTC range ``[start, end)`` of ``day``."""
    start = datetime.combine(day, time(), tzinfo=UTC)
    return start, start + timedelta(days=1)


def days(first: date, last: date) -> Iterator[date]:
    """Each day from ``first`` to ``last``, both included."""
    day = first
    while day <= last:
        yield day
        day += timedelta(days=1)


def is_partitioned(conn: Connection, table: str) -> bool:
    """Whether ``table`` is a partitioned table (PostgreSQL only)."""
    if conn.dialect.name != "postgresql":
        return False
    found = conn.execute(
        text("SELECT relkind FROM pg_class WHERE oid = to_regclass(:t)"), {"t": table}
    ).scalar()
    return found == "p"


def day_partitions(conn: Connection, table: str) -> dict[date, str]:
    """``table``'s day partitions by day, oldest first."""
    pattern = re.compile(rf"^{re.escape(table)}_p(\d{{8}})$")
    names = conn.execute(
        text(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = to_regclass(:t)"
        ),
        {"t": table},
    ).scalars()
    found = {}
    for name in names:
        match = pattern.match(name)
        if match:
            found[datetime.strptime(match.group(1), "%Y%m%d").date()] = name
    return dict(sorted(found.items()))


def _literal(at: datetime) -> str:
    # Partition bounds are DDL: no bind parameters. The value is formatted from a datetime.
    return f"'{at.isoformat()}'"


def create_day(conn: Connection, table: str, day: date) -> int:
    """Create ``table``'s partition for ``day``; returns the rows it took from the default.

    Run in a transaction of its own (the caller's): the rows leave the default
    partition and enter the new one in it, so readers see them in one place or the other.
    """
    column = PARTITIONED[table]
    start, end = day_bounds(day)
    default = default_name(table)
    conn.execute(text(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'"))
    waiting = conn.execute(
        text(f"SELECT count(*) FROM {default} WHERE {column} >= :s AND {column} < :e"),  # noqa: S608
        {"s": start, "e": end},
    ).scalar_one()
    if waiting:
        # A default row inside the new bounds would make CREATE refuse: move them through
        # a temporary table into the new partition.
        conn.execute(text(f"CREATE TEMPORARY TABLE quarry_moving (LIKE {table}) ON COMMIT DROP"))
        conn.execute(
            text(
                f"WITH moved AS (DELETE FROM {default} "  # noqa: S608 - constant names
                f"WHERE {column} >= :s AND {column} < :e RETURNING *) "
                "INSERT INTO quarry_moving SELECT * FROM moved"
            ),
            {"s": start, "e": end},
        )
    conn.execute(
        text(
            f"CREATE TABLE {day_name(table, day)} PARTITION OF {table} "
            f"FOR VALUES FROM ({_literal(start)}) TO ({_literal(end)})"
        )
    )
    if waiting:
        conn.execute(text(f"INSERT INTO {table} SELECT * FROM quarry_moving"))  # noqa: S608
        conn.execute(text("DROP TABLE quarry_moving"))
        _log.info("partitions: %s took %d rows from the default", day_name(table, day), waiting)
    return int(waiting)


def lock_busy(exc: BaseException) -> bool:
    """Whether ``exc`` is a partition step that gave up waiting for its lock."""
    cause = exc.__cause__
    return isinstance(getattr(cause, "orig", cause), psycopg.errors.LockNotAvailable)


def drop_day(conn: Connection, table: str, day: date) -> None:
    """Drop ``table``'s partition for ``day`` and every row in it."""
    conn.execute(text(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'"))
    conn.execute(text(f"DROP TABLE {day_name(table, day)}"))


class _Shape(NamedTuple):
    """What a table swap must carry over: the indexes and foreign keys (name, definition)
    and the id sequence's position."""

    indexes: list[tuple[str, str]]
    foreign: list[tuple[str, str]]
    last_value: int
    is_called: bool


def _set_aside(conn: Connection, table: str, old: str) -> _Shape:
    """Read ``table``'s shape, rename it ``old`` and strip its keys and indexes (their names
    are free for the table that replaces it)."""
    indexes = conn.execute(
        text(
            "SELECT indexname, indexdef FROM pg_indexes "
            "WHERE tablename = :t AND schemaname = current_schema() AND indexname NOT LIKE 'pk_%'"
        ),
        {"t": table},
    ).all()
    foreign = conn.execute(
        text(
            "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint "
            "WHERE conrelid = CAST(:t AS regclass) AND contype = 'f'"
        ),
        {"t": table},
    ).all()
    last_value, is_called = conn.execute(
        text(f"SELECT last_value, is_called FROM {table}_id_seq")  # noqa: S608
    ).one()
    conn.execute(text(f"ALTER TABLE {table} RENAME TO {old}"))
    for name, _definition in indexes:
        conn.execute(text(f"DROP INDEX {name}"))
    conn.execute(text(f"ALTER TABLE {old} DROP CONSTRAINT pk_{table}"))
    for name, _definition in foreign:
        conn.execute(text(f"ALTER TABLE {old} DROP CONSTRAINT {name}"))
    return _Shape(
        [(str(n), str(d)) for n, d in indexes],
        [(str(n), str(d)) for n, d in foreign],
        int(last_value),
        bool(is_called),
    )


def _restore(conn: Connection, table: str, shape: _Shape) -> None:
    """Put ``shape``'s sequence position, indexes and foreign keys on ``table`` (after the
    copy: each index is built once, not row by row)."""
    conn.execute(
        text("SELECT setval(CAST(:s AS regclass), :v, :c)"),
        {"s": f"{table}_id_seq", "v": shape.last_value, "c": shape.is_called},
    )
    for _name, definition in shape.indexes:
        conn.execute(text(definition))
    for name, definition in shape.foreign:
        conn.execute(text(f"ALTER TABLE {table} ADD CONSTRAINT {name} {definition}"))


def convert(conn: Connection, table: str, today: date) -> None:
    """Turn ``table`` (plain, with its identity ``id``) into its partitioned form.

    Every row is copied; the ids, the sequence's position, the columns, the
    indexes (recreated on the parent under the same names) and the foreign keys
    stay as they were. The primary key becomes ``(id, <time column>)``: a
    partitioned table's unique keys must hold its partition column. A day is
    created for each day that holds rows (up to :data:`MAX_BACKFILL_DAYS` back;
    older rows go to the default partition) and from yesterday to
    :data:`DAYS_AHEAD` after ``today``.
    """
    column = PARTITIONED[table]
    old = f"{table}_unpartitioned"
    sequence = f"{table}_id_seq"
    # The days that hold rows: one scan, next to the copy's own.
    held = conn.execute(
        text(f"SELECT DISTINCT date_trunc('day', {column}, 'UTC') FROM {table}")  # noqa: S608
    ).scalars()
    filled = {day.astimezone(UTC).date() for day in held}
    shape = _set_aside(conn, table, old)
    conn.execute(text(f"ALTER TABLE {old} ALTER COLUMN id DROP IDENTITY"))  # drops the sequence

    conn.execute(
        text(f"CREATE TABLE {table} (LIKE {old} INCLUDING DEFAULTS) PARTITION BY RANGE ({column})")
    )
    conn.execute(text(f"CREATE SEQUENCE {sequence} OWNED BY {table}.id"))
    conn.execute(text(f"ALTER TABLE {table} ALTER COLUMN id SET DEFAULT nextval('{sequence}')"))
    conn.execute(text(f"CREATE TABLE {default_name(table)} PARTITION OF {table} DEFAULT"))
    recent = set(days(today - timedelta(days=1), today + timedelta(days=DAYS_AHEAD)))
    oldest = today - timedelta(days=MAX_BACKFILL_DAYS)
    for day in sorted(recent | {day for day in filled if day >= oldest}):
        create_day(conn, table, day)

    conn.execute(text(f"INSERT INTO {table} SELECT * FROM {old}"))  # noqa: S608
    conn.execute(text(f"DROP TABLE {old}"))
    conn.execute(text(f"ALTER TABLE {table} ADD CONSTRAINT pk_{table} PRIMARY KEY (id, {column})"))
    _restore(conn, table, shape)


def unconvert(conn: Connection, table: str) -> None:
    """:func:`convert` undone: ``table`` plain again, with every row and its identity ``id``."""
    old = f"{table}_partitioned"
    shape = _set_aside(conn, table, old)
    conn.execute(text(f"ALTER TABLE {old} ALTER COLUMN id DROP DEFAULT"))
    conn.execute(text(f"DROP SEQUENCE {table}_id_seq"))
    conn.execute(text(f"CREATE TABLE {table} (LIKE {old})"))
    conn.execute(text(f"ALTER TABLE {table} ALTER COLUMN id ADD GENERATED BY DEFAULT AS IDENTITY"))
    conn.execute(text(f"INSERT INTO {table} SELECT * FROM {old}"))  # noqa: S608
    conn.execute(text(f"DROP TABLE {old}"))  # with its partitions
    conn.execute(text(f"ALTER TABLE {table} ADD CONSTRAINT pk_{table} PRIMARY KEY (id)"))
    _restore(conn, table, shape)
