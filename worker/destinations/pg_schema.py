"""The sql destination's shared vocabulary: bookkeeping columns, table and index names,
column types from values, and catalog lookups."""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import Sequence
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

import psycopg
from psycopg import sql

from worker.sources.base import Page

#: Per-row bookkeeping columns; a user column must not use these names.
META_COLUMNS = ("_quarry_run_id", "_quarry_slice", "_quarry_loaded_at")
_INTEGER_TYPES = {"smallint", "integer", "bigint"}
_WIDER_TYPES = {"double precision", "numeric"}
_COPY_CONTEXT = re.compile(r"line (\d+)(?:, column ([^:]+))?")
#: The per-slice temporary table a merge copies into (dropped at the slice's commit).
_MERGE_TEMP = sql.Identifier("pg_temp", "_quarry_merge")
#: Row order within a merge slice, so the last row of a key wins.
_SEQ = "_quarry_seq"
#: How long ``_quarry_finished`` remembers a finished replace (a crashed run's retry
#: comes back well within this).
_FINISHED_KEPT = "90 days"


#: Column types for new columns, by the first non-null value's Python type (first match).
_PG_TYPES: tuple[tuple[type | tuple[type, ...], str], ...] = (
    (bool, "boolean"),  # before int: a bool is an int
    (int, "bigint"),
    (float, "double precision"),
    (Decimal, "numeric"),
    (datetime, "timestamp"),  # before date; timestamptz when aware, below
    (date, "date"),
    (time, "time"),
    (timedelta, "interval"),
    ((bytes, bytearray, memoryview), "bytea"),
    (uuid.UUID, "uuid"),
    ((dict, list), "jsonb"),
)


def pg_type(value: Any) -> str | None:
    """The column type a new column gets from its first non-null value (``text`` otherwise)."""
    if value is None:
        return None
    for kind, name in _PG_TYPES:
        if isinstance(value, kind):
            aware = isinstance(value, datetime) and value.tzinfo is not None
            return "timestamptz" if aware else name
    return "text"


def stage_name(table: str, run_id: str) -> str:
    """The staging table a ``replace`` run writes ``table``'s rows to (38 bytes, deterministic)."""
    digest = hashlib.sha256(f"{table}\x00{run_id}".encode()).hexdigest()[:24]
    return f"_quarry_stage_{digest}"


def _slice_index(table: str) -> str:
    """The name of the ``(_quarry_run_id, _quarry_slice)`` index on ``table``."""
    return f"{table}_quarry_slice_idx"[:63]


def _key_index(table: str) -> str:
    """The name of the unique index merge gives ``table``, within PostgreSQL's 63 bytes."""
    name = f"{table}_quarry_key"
    if len(name.encode()) <= 63:
        return name
    digest = hashlib.sha256(table.encode()).hexdigest()[:8]
    return f"{table.encode()[:40].decode(errors='ignore')}_{digest}_quarry_key"


def _columns_of(page: Page) -> list[str]:
    """The page's column names: the first row's order, then later arrivals."""
    names = list(page[0])
    later = set().union(*page) - set(names)
    for row in page if later else ():
        for key in row:
            if key in later:
                names.append(key)
                later.discard(key)
    return names


def _table_columns(conn: psycopg.Connection[Any], schema: str, table: str) -> dict[str, str]:
    """A table's columns and their full types (``numeric(10,2)``), in order; empty if absent."""
    rows = conn.execute(
        "SELECT a.attname, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a"
        " JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s AND c.relname = %s AND a.attnum > 0 AND NOT a.attisdropped"
        " ORDER BY a.attnum",
        (schema, table),
    ).fetchall()
    return {str(name): str(kind) for name, kind in rows}


def _exists(conn: psycopg.Connection[Any], schema: str, name: str) -> bool:
    return (
        conn.execute(
            "SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = %s AND c.relname = %s",
            (schema, name),
        ).fetchone()
        is not None
    )


def _names(columns: Sequence[str]) -> sql.Composed:
    return sql.SQL(", ").join(sql.Identifier(c) for c in columns)
