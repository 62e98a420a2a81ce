"""Extraction benchmarks: SQL -> Parquet and SQL -> PostgreSQL through a real Quarry run.

Each is measured against a plain script doing the same copy without Quarry, in
the same run on the same database: a server-side cursor fetching pages, written
with pyarrow's ParquetWriter or psycopg's COPY. The Quarry figure is the run's
own duration (``started_at`` to ``finished_at`` in the store, on a real
``celery -A worker worker``), sliced by id into 10 windows, so it includes the
checkpoints, heartbeats and log entries a production run pays for.

Peak memory is the pool child's ``VmHWM`` after a run: the same worker
configuration on 1M rows and on 10M rows shows whether memory stays flat.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg
import pyarrow as pa
import pyarrow.parquet as pq

from tests.acceptance.harness import Cluster, wait_for
from worker.models import Status

PAGE = 10_000
SLICES = 10


def conninfo(url: str) -> str:
    """A libpq conninfo from a SQLAlchemy URL."""
    return url.replace("postgresql+psycopg://", "postgresql://")


def prepare(url: str, rows: int, table: str = "bench_src") -> None:
    """A source table of ``rows`` orders-like rows (id 1..rows), reused when already there."""
    with psycopg.connect(conninfo(url), autocommit=True) as conn:
        with contextlib.suppress(psycopg.errors.UndefinedTable):
            (have,) = conn.execute(f"SELECT count(*) FROM {table}").fetchone() or (0,)
            if have == rows:
                return
        conn.execute(f"DROP TABLE IF EXISTS {table}")
        conn.execute(
            f"CREATE TABLE {table} AS SELECT g::bigint AS id,"
            " timestamptz '2026-01-01' + g * interval '1 second' AS created_at,"
            " 'customer ' || (g % 1000) AS customer, ((g % 10000) / 100.0)::numeric(10,2) AS amount,"
            " (g % 7)::int AS qty, CASE WHEN g % 5 = 0 THEN NULL ELSE 'note ' || g END AS note"
            f" FROM generate_series(1, {rows}) g"
        )
        conn.execute(f"ALTER TABLE {table} ADD PRIMARY KEY (id)")
        conn.execute(f"ANALYZE {table}")


def plain_parquet(url: str, out: Path, table: str = "bench_src") -> float:
    """Rows/s of a plain server-side cursor -> ParquetWriter copy."""
    started = time.perf_counter()
    count = 0
    with psycopg.connect(conninfo(url)) as conn, conn.cursor(name="plain_parquet") as cur:
        cur.itersize = PAGE
        cur.execute(f"SELECT * FROM {table}")
        writer: pq.ParquetWriter | None = None
        names: list[str] = []
        while rows := cur.fetchmany(PAGE):
            names = names or [c.name for c in cur.description or ()]
            batch = pa.Table.from_arrays(
                [pa.array(col) for col in zip(*rows, strict=True)], names=names
            )
            if writer is None:
                writer = pq.ParquetWriter(out / "plain.parquet", batch.schema)
            writer.write_table(batch)
            count += len(rows)
        if writer is not None:
            writer.close()
    return count / (time.perf_counter() - started)


def plain_postgres(url: str, table: str = "bench_src") -> float:
    """Rows/s of a plain server-side cursor -> COPY into another table, one transaction."""
    started = time.perf_counter()
    count = 0
    with psycopg.connect(conninfo(url)) as src, psycopg.connect(conninfo(url)) as dst:
        dst.execute("DROP TABLE IF EXISTS bench_plain_dst")
        dst.execute(f"CREATE TABLE bench_plain_dst (LIKE {table})")
        with src.cursor(name="plain_pg") as cur, dst.cursor() as out:
            cur.itersize = PAGE
            cur.execute(f"SELECT * FROM {table}")
            with out.copy("COPY bench_plain_dst FROM STDIN") as copy:
                while rows := cur.fetchmany(PAGE):
                    for r in rows:
                        copy.write_row(r)
                    count += len(rows)
        dst.commit()
        dst.execute("DROP TABLE bench_plain_dst")
        dst.commit()
    return count / (time.perf_counter() - started)


def _vm(pid: int, field: str) -> int:
    """A /proc/PID/status field in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def quarry_run(
    url: str, redis: str, rows: int, destination: str, table: str = "bench_src"
) -> dict[str, Any]:
    """One sliced run on a fresh real worker: rows/s over the run's own duration, peak RSS."""
    tmp = Path(tempfile.mkdtemp(prefix="quarry-bench-extract-"))
    schema = f"bench_{secrets.token_hex(3)}"
    dest = (
        'type = "files"\nformat = "parquet"'
        if destination == "parquet"
        else f'type = "sql"\nurl = "{url}"\nschema = "{schema}"'
    )
    step = -(-rows // SLICES)
    cluster = Cluster(tmp, database_url=url, broker_url=redis)
    try:
        with cluster.pipelines_file.open("a") as fh:
            fh.write(
                f'''
[pipelines.bench_copy.source]
type = "sql"
url = "{url}"
page_size = {PAGE}

[[pipelines.bench_copy.resources]]
name = "orders"
slices = {{ start = 1, end = {rows + 1}, step = {step} }}
options = {{ table = "{table}", slice_column = "id" }}

[pipelines.bench_copy.destination]
{dest}
'''
            )
        worker = cluster.worker("bench")
        child = wait_for(lambda: (c := worker.children()) and c[0], "the pool child", 60)
        idle_kib = _vm(child, "VmRSS")
        run_id = cluster.trigger("bench_copy")
        run = cluster.wait_status(run_id, Status.SUCCEEDED, Status.FAILED, timeout=3600)
        if run.status is not Status.SUCCEEDED:
            msg = f"bench run failed: {run.error_summary}"
            raise RuntimeError(msg)
        peak_kib = _vm(child, "VmHWM")
        assert run.started_at is not None and run.finished_at is not None
        seconds = (run.finished_at - run.started_at).total_seconds()
        written = int(run.telemetry_summary.get("rows_loaded", 0))
        if written != rows:
            msg = f"bench run wrote {written:,} rows, expected {rows:,}"
            raise RuntimeError(msg)
        return {
            "rows_per_s": written / seconds,
            "seconds": seconds,
            "idle_mib": idle_kib / 1024,
            "peak_mib": peak_kib / 1024,
        }
    finally:
        cluster.close()
        if destination != "parquet":
            with psycopg.connect(conninfo(url), autocommit=True) as conn:
                conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        for path in sorted(tmp.rglob("*"), reverse=True):
            with contextlib.suppress(OSError):
                path.unlink() if path.is_file() else path.rmdir()


def measure(
    url: str, redis: str, rows: int, memory_rows: int
) -> list[tuple[str, str, str, str, str]]:
    """The table rows: throughput ratios and the flat-memory figures."""
    out: list[tuple[str, str, str, str, str]] = []
    prepare(url, rows)
    with tempfile.TemporaryDirectory() as tmp:
        plain = plain_parquet(url, Path(tmp))
    ours = quarry_run(url, redis, rows, "parquet")
    out.append(
        (
            f"SQL -> Parquet rows/s, {rows:,} rows",
            f"{ours['rows_per_s']:,.0f}",
            f"{plain:,.0f}",
            f"{ours['rows_per_s'] / plain:.0%}",
            ">= 70%",
        )
    )
    plain_pg = plain_postgres(url)
    ours_pg = quarry_run(url, redis, rows, "sql")
    out.append(
        (
            f"SQL -> PostgreSQL rows/s, {rows:,} rows",
            f"{ours_pg['rows_per_s']:,.0f}",
            f"{plain_pg:,.0f}",
            f"{ours_pg['rows_per_s'] / plain_pg:.0%}",
            ">= 70%",
        )
    )
    out.append(
        (
            f"worker peak RSS MiB, Parquet, {rows:,} rows",
            f"{ours['peak_mib']:.0f}",
            f"{ours['idle_mib']:.0f} idle",
            "",
            "",
        )
    )
    out.append(
        (
            f"worker peak RSS MiB, PostgreSQL, {rows:,} rows",
            f"{ours_pg['peak_mib']:.0f}",
            f"{ours_pg['idle_mib']:.0f} idle",
            "",
            "",
        )
    )
    if memory_rows > rows:
        prepare(url, memory_rows, "bench_big")
        for kind in ("parquet", "sql"):
            big = quarry_run(url, redis, memory_rows, kind, table="bench_big")
            small = ours if kind == "parquet" else ours_pg
            out.append((
                f"worker peak RSS MiB, {'Parquet' if kind == 'parquet' else 'PostgreSQL'}, {memory_rows:,} rows",
                f"{big['peak_mib']:.0f}",
                f"{small['peak_mib']:.0f} at {rows:,}",
                f"{big['peak_mib'] / small['peak_mib']:.2f}x",
                f"flat ({big['rows_per_s']:,.0f} rows/s)",
            ))  # fmt: skip
    return out


if __name__ == "__main__":  # pragma: no cover - `python -m bench.extract URL` for this part alone
    import sys

    for line in measure(
        sys.argv[1],
        os.environ.get("QUARRY_TEST_REDIS_URL", "redis://127.0.0.1:6379/0"),
        int(os.environ.get("BENCH_EXTRACT_ROWS", "1000000")),
        int(os.environ.get("BENCH_EXTRACT_MEMORY_ROWS", "0")),
    ):
        print(" | ".join(line))
