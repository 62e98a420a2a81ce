"""Warning and error pages read a partial index: no severity page is slower than a first page."""

from __future__ import annotations

import sqlite3

import psycopg
import pytest
from sqlalchemy.dialects import sqlite as sqlite_dialect

from worker.models import Level
from worker.store import Store
from worker.store.reads import _EntryQuery
from worker.store.tables import LEVEL_FILTERS


def query(level: Level) -> _EntryQuery:
    return _EntryQuery("run_x", 0, 1000, level, None, None, None, None, None)


@pytest.mark.parametrize(("level", "index"), [(Level.WARNING, "warning"), (Level.ERROR, "error")])
def test_sqlite_plans_severity_pages_on_the_partial_index(
    sqlite_url: str, level: Level, index: str
) -> None:
    """SQLite uses a partial index only for the identical term: the page query has it."""
    sql, params = query(level).sqlite(sqlite_dialect.dialect())
    assert LEVEL_FILTERS[index] in sql
    with sqlite3.connect(sqlite_url.removeprefix("sqlite:///")) as conn:
        plan = " ".join(str(row[-1]) for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}", params))
    assert f"ix_log_entries_run_id_id_{index}" in plan


def test_postgres_has_the_partial_indexes_with_the_page_predicates(pg_url: str) -> None:
    """The migration's predicates are the store's filters (PostgreSQL normalises the text)."""
    Store(pg_url).close()
    with psycopg.connect(pg_url.replace("postgresql+psycopg://", "postgresql://")) as conn:
        rows = dict(
            conn.execute(
                "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'log_entries' AND indexname LIKE '%%_warning' OR indexname LIKE '%%_error'"
            ).fetchall()
        )
    assert (
        "'warning'" in rows["ix_log_entries_run_id_id_warning"]
        and "'error'" in rows["ix_log_entries_run_id_id_warning"]
    )
    assert (
        "'error'" in rows["ix_log_entries_run_id_id_error"]
        and "warning" not in rows["ix_log_entries_run_id_id_error"]
    )
    sql, _ = query(Level.WARNING).postgresql(utc=True)
    assert LEVEL_FILTERS["warning"] in sql


def test_info_pages_keep_the_parameterised_filter() -> None:
    """``level=info`` (everything but debug) has no partial index and stays a bound IN list."""
    sql, params = query(Level.INFO).sqlite(sqlite_dialect.dialect())
    assert "level IN (?, ?, ?)" in sql and {"info", "warning", "error"} <= set(params)
