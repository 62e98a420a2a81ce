"""Merge throughput of the sql destination against a plain upsert script: ``python -m bench.merge``.

``BENCH_MERGE_ROWS`` rows (default 200,000) in slices of ``BENCH_MERGE_SLICE``
(50,000), each slice as pages of 10,000 tuples (``RowPage``, as the SQL source
yields them), are merged on ``id`` twice: the first pass inserts every row,
the second updates every row. Quarry's figure goes through
:class:`PostgresDestination` (claim, COPY into the temporary table, the
``DISTINCT ON`` upsert with bookkeeping columns, commit per slice). The
baseline is a plain psycopg script doing the same per slice with the same
data: COPY into a temporary table, one ``INSERT … ON CONFLICT (id) DO UPDATE``,
commit. Both write to fresh tables in one fresh database, in alternating
order, ``BENCH_MERGE_ROUNDS`` (3) times; the medians are printed.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg

from bench.__main__ import drop_pg, fresh_pg, row
from worker.destinations import SliceKey, WriteSpec
from worker.destinations.postgres import PostgresConfig, PostgresDestination
from worker.pipelines import WriteMode
from worker.sources.base import RowPage

ROWS = int(os.environ.get("BENCH_MERGE_ROWS", "200000"))
SLICE = int(os.environ.get("BENCH_MERGE_SLICE", "50000"))
ROUNDS = int(os.environ.get("BENCH_MERGE_ROUNDS", "3"))
PAGE = 10_000
DATABASE = "quarry_bench_merge"
SCHEMA = "bench_merge"
COLUMNS = ["id", "created_at", "customer", "amount", "qty", "note"]
#: The types the destination gives these values, so both sides write the same table shape.
DDL = (
    "id bigint PRIMARY KEY, created_at timestamp with time zone, customer text,"
    " amount numeric, qty bigint, note text"
)

Rows = list[tuple[Any, ...]]


class _NullLog:
    """Stands in for the run's logger (a merge into a fresh table logs nothing)."""

    def info(self, event: str, **fields: Any) -> None:
        """Drop an info entry."""

    def warning(self, event: str, **fields: Any) -> None:
        """Drop a warning entry."""


def make_rows(count: int, version: int) -> Rows:
    """``count`` order-like tuples; ``version`` changes every non-key value."""
    start = datetime(2026, 1, 1, tzinfo=UTC)
    return [
        (
            i,
            start + timedelta(seconds=i + version),
            f"customer {(i + version) % 1000}",
            Decimal(i % 10_000 + version) / 100,
            (i + version) % 7,
            None if i % 5 == 0 else f"note {i} v{version}",
        )
        for i in range(1, count + 1)
    ]


def slices(rows: Rows) -> list[list[Rows]]:
    """The rows as slices of ``SLICE``, each as pages of ``PAGE``."""
    return [
        [rows[p : p + PAGE] for p in range(s, min(s + SLICE, len(rows)), PAGE)]
        for s in range(0, len(rows), SLICE)
    ]


def conninfo(url: str) -> str:
    """A libpq conninfo from a SQLAlchemy URL."""
    return url.replace("postgresql+psycopg://", "postgresql://")


def through_quarry(url: str, passes: Sequence[list[list[Rows]]], tag: str) -> list[float]:
    """Seconds per pass of merging through the sql destination into a fresh table."""
    with psycopg.connect(conninfo(url), autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
    dest = PostgresDestination(PostgresConfig(url=url, db_schema=SCHEMA, table="quarry_{resource}"))
    spec = WriteSpec(WriteMode.MERGE, ("id",))
    log: Any = _NullLog()
    times = []
    try:
        for number, pages_by_slice in enumerate(passes, start=1):
            began = time.perf_counter()
            for index, pages in enumerate(pages_by_slice, start=1):
                key = SliceKey("bench", f"{tag}_{number}", "orders", index, 1, write=spec)
                staged = dest.stage(key, log)
                for page in pages:
                    staged.write(RowPage(COLUMNS, page))
                staged.seal()
                staged.publish()
            times.append(time.perf_counter() - began)
    finally:
        dest.close()
    return times


def plain_upsert(url: str, passes: Sequence[list[list[Rows]]]) -> list[float]:
    """Seconds per pass of a plain script: COPY into a temporary table, one upsert, commit."""
    updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in COLUMNS[1:])
    names = ", ".join(COLUMNS)
    times = []
    with psycopg.connect(conninfo(url)) as conn:
        conn.execute("DROP TABLE IF EXISTS plain_orders")
        conn.execute(f"CREATE TABLE plain_orders ({DDL})")
        conn.commit()
        for pages_by_slice in passes:
            began = time.perf_counter()
            for pages in pages_by_slice:
                conn.execute("CREATE TEMP TABLE stage (LIKE plain_orders) ON COMMIT DROP")
                with conn.cursor() as cur, cur.copy(f"COPY stage ({names}) FROM STDIN") as copy:
                    for page in pages:
                        for values in page:
                            copy.write_row(values)
                conn.execute(
                    f"INSERT INTO plain_orders ({names}) SELECT {names} FROM stage"
                    f" ON CONFLICT (id) DO UPDATE SET {updates}"
                )
                conn.commit()
            times.append(time.perf_counter() - began)
    return times


def check(url: str, expected: Rows) -> None:
    """Both tables hold the second pass's rows, one per key."""
    with psycopg.connect(conninfo(url)) as conn:
        for table in (f"{SCHEMA}.quarry_orders", "plain_orders"):
            got = conn.execute(f"SELECT {', '.join(COLUMNS)} FROM {table} ORDER BY id").fetchall()
            assert got == expected, f"{table} does not hold the second pass's rows"


def measure(url: str) -> dict[str, tuple[float, float]]:
    """Median rows/s per pass (``insert``, ``update``, ``both``): (quarry, plain)."""
    first, second = make_rows(ROWS, 0), make_rows(ROWS, 1)
    passes = [slices(first), slices(second)]
    quarry: list[list[float]] = []
    plain: list[list[float]] = []
    sides: list[tuple[list[list[float]], Callable[[int], list[float]]]] = [
        (quarry, lambda n: through_quarry(url, passes, f"round{n}")),
        (plain, lambda n: plain_upsert(url, passes)),
    ]
    for number in range(ROUNDS):
        for samples, run in sides if number % 2 == 0 else sides[::-1]:
            samples.append(run(number))
    check(url, second)

    def rate(samples: list[list[float]], pick: Callable[[list[float]], float], rows: int) -> float:
        return statistics.median(rows / pick(s) for s in samples)

    return {
        label: (rate(quarry, pick, rows), rate(plain, pick, rows))
        for label, pick, rows in (
            ("insert", lambda s: s[0], ROWS),
            ("update", lambda s: s[1], ROWS),
            ("both", sum, 2 * ROWS),
        )
    }


def main() -> int:
    """Print Quarry's merge rows/s against the plain script's, per pass and overall."""
    url = fresh_pg(DATABASE)
    if url is None:
        return 1
    try:
        results = measure(url)
    finally:
        drop_pg(DATABASE)
    print(
        f"merge on id: {ROWS:,} rows in slices of {SLICE:,} (pages of {PAGE:,} tuples), "
        f"inserted then all updated; median of {ROUNDS} rounds; "
        "baseline: COPY into a temp table + one INSERT … ON CONFLICT DO UPDATE per slice\n"
    )
    row("measure", "quarry", "raw baseline", "ratio", "goal")
    row("-" * 58, "-" * 14, "-" * 14, "-" * 8, "-" * 10)
    for label, (ours, raw) in results.items():
        row(
            f"merge rows/s, sql destination, {label}",
            f"{ours:,.0f}",
            f"{raw:,.0f}",
            f"{ours / raw:.0%}",
            ">= 70%" if label == "both" else "",
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
