"""The SQL source against real PostgreSQL and MariaDB (and SQLite): tables, queries, slices."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest

from tests.extract.conftest import RecordingLog, load_orders
from worker.errors import ConfigError, SourceError
from worker.pipelines import ResourceConfig, SliceSpec, plan_slices
from worker.sources import build_source
from worker.sources.base import ReadContext, decode_mark, encode_mark
from worker.sources.sql import SqlSource

COUNT = 1500  # one a minute: 25 hours of orders


@pytest.fixture(params=["postgres", "mariadb", "sqlite"])
def source_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A database holding ``src_orders``, on each engine."""
    if request.param == "postgres":
        url = str(request.getfixturevalue("pg_url"))
    elif request.param == "mariadb":
        url = str(request.getfixturevalue("mysql_url"))
    else:
        url = f"sqlite:///{tmp_path / 'source.db'}"
    load_orders(url, COUNT)
    return url


@pytest.fixture
def source(source_url: str) -> Iterator[SqlSource]:
    """A SQL source reading pages of 100 rows."""
    s = SqlSource.from_options({"url": source_url, "page_size": 100})
    yield s
    s.close()


def rows_of(source: SqlSource, resource: ResourceConfig, window=None, since=None) -> list[dict]:  # type: ignore[no-untyped-def]
    ctx = ReadContext(log=RecordingLog(), since=since)
    return [row for page in source.read(resource, window, ctx) for row in page]


def test_a_table_streams_in_pages_with_its_types(source: SqlSource) -> None:
    """Every row, in pages of ``page_size``, with database types mapped to Python ones."""
    resource = ResourceConfig(name="orders", options={"table": "src_orders", "order_by": ["id"]})
    pages = list(source.read(resource, None, ReadContext(log=None)))
    assert [len(p) for p in pages] == [100] * 15
    rows = [r for p in pages for r in p]
    assert [r["id"] for r in rows] == list(range(COUNT))
    assert rows[7]["amount"] == Decimal("8.75")
    assert isinstance(rows[0]["created_at"], datetime | str)  # SQLite keeps text
    assert set(rows[0]) == {"id", "created_at", "customer", "amount", "paid", "note"}


def test_time_slices_cover_every_row_exactly_once(source: SqlSource) -> None:
    """Windows over ``created_at`` partition the table: no row missing, none twice."""
    spec = SliceSpec(
        start=datetime(2026, 1, 1, tzinfo=UTC), end=datetime(2026, 1, 2, 2, tzinfo=UTC), step="1h"
    )
    resource = ResourceConfig(
        name="orders", slices=spec, options={"table": "src_orders", "slice_column": "created_at"}
    )
    if "sqlite" in str(source.engine.url):
        pytest.skip("SQLite stores the timestamps as text; windows compare datetimes")
    seen: list[int] = []
    for window in plan_slices(spec):
        part = rows_of(source, resource, window)
        assert all(window.start <= r["created_at"].replace(tzinfo=UTC) < window.end for r in part)
        seen += [r["id"] for r in part]
    assert sorted(seen) == list(range(COUNT))


def test_integer_slices_and_a_named_query(source: SqlSource) -> None:
    """A query resource sliced by an integer column reads exactly its windows."""
    spec = SliceSpec(start=0, end=COUNT, step=400)
    assert [(w.start, w.end) for w in plan_slices(spec)] == [
        (0, 400),
        (400, 800),
        (800, 1200),
        (1200, 1500),
    ]
    resource = ResourceConfig(
        name="paid",
        slices=spec,
        options={
            "query": "SELECT id, amount FROM src_orders WHERE paid = TRUE",
            "slice_column": "id",
        },
    )
    ids = [r["id"] for w in plan_slices(spec) for r in rows_of(source, resource, w)]
    assert sorted(ids) == [i for i in range(COUNT) if i % 3 == 0]


def test_incremental_reads_above_the_mark_and_reports_the_new_one(source: SqlSource) -> None:
    """``cursor_column``: only rows above ``since``; ``high_water`` is the highest read."""
    resource = ResourceConfig(
        name="orders",
        options={"table": "src_orders", "cursor_column": "id", "columns": ["id", "customer"]},
    )
    ctx = ReadContext(log=None)
    first = [r for p in source.read(resource, None, ctx) for r in p]
    assert len(first) == COUNT and ctx.high_water == COUNT - 1
    assert set(first[0]) == {"id", "customer"}
    ctx = ReadContext(log=None, since=decode_mark(encode_mark(1400)))
    again = [r["id"] for p in source.read(resource, None, ctx) for r in p]
    assert sorted(again) == list(range(1401, COUNT))


def test_marks_round_trip_through_json() -> None:
    """Timestamps, dates and decimals survive the checkpoint's JSON."""
    for mark in (
        5,
        "abc",
        datetime(2026, 1, 1, 5, tzinfo=UTC),
        Decimal("1.50"),
        datetime(2026, 1, 1).date(),
    ):
        assert decode_mark(encode_mark(mark)) == mark


def test_config_errors_name_the_field(source_url: str) -> None:
    """Unknown options, both or neither of table/query, missing columns: named, no I/O done."""
    with pytest.raises(ConfigError, match=r"source\.page_size"):
        build_source("sql", {"url": source_url, "page_size": 0})
    with pytest.raises(ConfigError, match=r"source\.url: no driver"):
        build_source("sql", {"url": "nosuchdb+nodriver://x/y"})
    s = SqlSource.from_options({"url": source_url})
    try:
        with pytest.raises(
            ConfigError, match=r"resources\.x\.options.*exactly one of table or query"
        ):
            rows_of(s, ResourceConfig(name="x", options={}))
        with pytest.raises(ConfigError, match=r"resources\.x\.options: no column 'nope'"):
            rows_of(
                s,
                ResourceConfig(name="x", options={"table": "src_orders", "cursor_column": "nope"}),
            )
        with pytest.raises(ConfigError, match=r"slice_column: a sliced resource"):
            rows_of(
                s,
                ResourceConfig(
                    name="x",
                    slices=SliceSpec(start=0, end=5, step=1),
                    options={"table": "src_orders"},
                ),
            )
        with pytest.raises(SourceError, match=r"no table 'missing'"):
            rows_of(s, ResourceConfig(name="x", options={"table": "missing"}))
    finally:
        s.close()


def test_connection_errors_never_carry_the_password(pg_url: str) -> None:
    """A failing connection is a SourceError without the URL's password or the SQL."""
    url = (
        pg_url.replace("postgres@", "postgres:Sup3r-S3cret-pw@").rsplit("/", 1)[0]
        + "/no_such_db_here"
    )
    s = SqlSource.from_options({"url": url})
    try:
        with pytest.raises(SourceError) as info:
            rows_of(s, ResourceConfig(name="x", options={"table": "t"}))
    finally:
        s.close()
    assert "Sup3r-S3cret-pw" not in str(info.value)
    assert "no_such_db_here" in str(info.value)


def test_postgres_reads_through_a_server_side_cursor(pg_url: str) -> None:
    """While a page is being handled, the server holds an open cursor: the table is not
    fetched whole into the worker."""
    load_orders(pg_url, COUNT)
    s = SqlSource.from_options({"url": pg_url, "page_size": 100})
    resource = ResourceConfig(name="orders", options={"table": "src_orders"})
    pages = s.read(resource, None, ReadContext(log=None))
    next(pages)
    conninfo = pg_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(conninfo) as admin:
        queries = [q for (q,) in admin.execute("SELECT query FROM pg_stat_activity").fetchall()]
    assert any(q.lstrip().upper().startswith(("FETCH", "DECLARE")) for q in queries), queries
    assert sum(len(p) for p in pages) == COUNT - 100
    s.close()


@pytest.mark.filterwarnings("error::UserWarning")  # pymysql's "unbuffered result left incomplete"
def test_a_source_read_can_be_abandoned_mid_slice(source: SqlSource) -> None:
    """Closing the generator (SIGTERM between pages) releases the cursor and connection;
    on MariaDB the query is killed instead of drained row by row."""
    resource = ResourceConfig(name="orders", options={"table": "src_orders"})
    pages = source.read(resource, None, ReadContext(log=None))
    next(pages)
    pages.close()
    assert len(rows_of(source, resource)) == COUNT  # the pool's connection is usable again


def test_a_query_may_place_the_window_and_mark_itself(source: SqlSource) -> None:
    """``:window_start``/``:window_end``/``:since`` bind inside the query (no outer filter)."""
    query = "SELECT id, customer FROM src_orders WHERE id >= :window_start AND id < :window_end AND id > :since"
    spec = SliceSpec(start=0, end=1000, step=500)
    resource = ResourceConfig(
        name="q", slices=spec, options={"query": query, "cursor_column": "id"}
    )
    ids = [r["id"] for w in plan_slices(spec) for r in rows_of(source, resource, w, since=100)]
    assert sorted(ids) == list(range(101, 1000))
