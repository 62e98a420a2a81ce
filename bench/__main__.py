"""``make bench``: every figure against a raw baseline measured in the same run."""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
from pathlib import Path

from sqlalchemy import create_engine, text

from bench import api, extract, ingest, recovery, slices
from worker.store import Store

PG_ADMIN = os.environ.get(
    "QUARRY_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
REDIS = os.environ.get("QUARRY_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
AMQP = os.environ.get("QUARRY_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
RUNS = int(os.environ.get("BENCH_RUNS", "4"))
PER_RUN = int(os.environ.get("BENCH_PER_RUN", "50000"))
EXTRACT_ROWS = int(os.environ.get("BENCH_EXTRACT_ROWS", "1000000"))
MEMORY_ROWS = int(os.environ.get("BENCH_EXTRACT_MEMORY_ROWS", "10000000"))


def fresh_pg(name: str) -> str | None:
    """A new, migrated PostgreSQL database, or None when there is no server."""
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:
        print(f"(no PostgreSQL: {exc.__class__.__name__}; PostgreSQL figures skipped)")
        return None
    finally:
        admin.dispose()
    url = PG_ADMIN.rsplit("/", 1)[0] + f"/{name}"
    store = Store(url)
    store.upgrade()
    store.close()
    return url


def drop_pg(name: str) -> None:
    """Drop a bench database, so nothing (autovacuum) works on it while later parts run."""
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


def row(name: str, value: str, baseline: str = "", ratio: str = "", goal: str = "") -> None:
    """Print one result line."""
    print(f"{name:<58} {value:>14} {baseline:>14} {ratio:>8}  {goal}")


def main() -> int:
    """Run every benchmark and print a table (``python -m bench api``: the API part alone)."""
    total = RUNS * PER_RUN
    tmp = Path(tempfile.mkdtemp(prefix="quarry-bench-"))
    if sys.argv[1:]:
        return part(sys.argv[1:], tmp)
    print(
        f"Quarry bench — {RUNS} concurrent runs × {PER_RUN:,} entries = {total:,} entries; {os.cpu_count()} cores\n"
    )
    row("measure", "quarry", "raw baseline", "ratio", "goal")
    row("-" * 58, "-" * 14, "-" * 14, "-" * 8, "-" * 10)

    ingest_rows(tmp)

    for label, url in (
        ("SQLite", ingest.fresh_sqlite(tmp, "slices.db")),
        ("PostgreSQL", fresh_pg("quarry_bench_slices")),
    ):
        if url is None:
            continue
        commit = slices.raw_commit_ms(url)
        for destination in ("null", "files"):
            per = slices.runner_per_slice_ms(url, tmp / f"{label}-{destination}", destination)
            goal = "<= 2 ms" if label == "PostgreSQL" and destination == "null" else ""
            row(
                f"per-slice overhead ms, {label}, {destination} destination",
                f"{per:.2f}",
                f"{commit:.2f}",
                f"{per / commit:.1f}x",
                goal,
            )
    print(
        "\nbaseline for per-slice rows: one durable commit of a checkpoint UPDATE via the raw driver"
    )
    if os.environ.get("BENCH_SKIP_EXTRACT") != "1":
        extract_rows()
    if os.environ.get("BENCH_SKIP_API") != "1":
        api_rows(tmp)
    pg_rec = fresh_pg("quarry_bench_recovery")
    if pg_rec and os.environ.get("BENCH_SKIP_RECOVERY") != "1":
        recovery_rows(pg_rec)
    if os.environ.get("BENCH_SKIP_UNATTENDED") != "1":
        unattended_rows()
    if os.environ.get("BENCH_SKIP_SCALE") != "1":
        scale_rows()
    return 0


def ingest_rows(tmp: Path) -> None:
    """Log ingestion on SQLite and PostgreSQL, and the log call's cost (bench.ingest)."""
    total = RUNS * PER_RUN
    sq = ingest.fresh_sqlite(tmp, "ingest.db")
    raw = ingest.raw_sqlite_executemany(ingest.fresh_sqlite(tmp, "raw.db"), total)
    ours = ingest.ingest_through_quarry(sq, RUNS, PER_RUN)
    row(
        "ingest entries/s, SQLite (vs executemany 1000/commit)",
        f"{ours:,.0f}",
        f"{raw:,.0f}",
        f"{ours / raw:.0%}",
        ">= 50%",
    )
    raw_multi = ingest.raw_sqlite_multirow(ingest.fresh_sqlite(tmp, "raw-multi.db"), total)
    row(
        "ingest entries/s, SQLite (vs multi-row INSERT 1000/commit)",
        f"{ours:,.0f}",
        f"{raw_multi:,.0f}",
        f"{ours / raw_multi:.0%}",
        "",
    )

    pg = fresh_pg("quarry_bench")
    if pg:
        raw_many = ingest.raw_pg_executemany(pg, total)
        raw_copy = ingest.raw_pg_copy(pg, total)
        ours_pg = ingest.ingest_through_quarry(pg, RUNS, PER_RUN)
        row(
            "ingest entries/s, PostgreSQL (vs COPY 1000/commit)",
            f"{ours_pg:,.0f}",
            f"{raw_copy:,.0f}",
            f"{ours_pg / raw_copy:.0%}",
            ">= 50%",
        )
        row(
            "ingest entries/s, PostgreSQL (vs executemany 1000/commit)",
            f"{ours_pg:,.0f}",
            f"{raw_many:,.0f}",
            f"{ours_pg / raw_many:.0%}",
            "",
        )

    costs = ingest.log_call_cost()
    base = costs.pop("structlog JSON to a null sink (baseline)")
    row("structlog JSON to a null sink, µs/call (baseline)", f"{base:.2f}", "", "", "")
    for name, value in costs.items():
        row(f"{name}, µs/call", f"{value:.2f}", f"{base:.2f}", f"{value / base:.1f}x", "<= 20 µs")


def part(args: list[str], tmp: Path) -> int:
    """One part alone: ``ingest``, ``api``, ``unattended``, ``recovery`` or ``scale``."""
    if args == ["ingest"]:
        ingest_rows(tmp)
        return 0
    if args == ["api"]:
        api_rows(tmp)
        return 0
    if args == ["unattended"]:
        return unattended_rows()
    if args == ["scale"]:
        return scale_rows()
    if args == ["recovery"]:
        url = fresh_pg("quarry_bench_recovery")
        if url is None:
            return 1
        recovery_rows(url)
        return 0
    print(
        f"usage: python -m bench [ingest|api|unattended|recovery|scale]; got {' '.join(args)!r}",
        file=sys.stderr,
    )
    return 2


def scale_rows() -> int:
    """Log ingestion with many writers and many runs on PostgreSQL (bench.scale), stream
    clients over several API processes (bench.streams), pages at 20 million entries in
    daily partitions (bench.partitions)."""
    from bench import scale  # noqa: PLC0415 - it imports this module's helpers

    url = fresh_pg("quarry_bench_scale")
    if url is None:
        return 1
    try:
        scale.main(url, row)
    finally:
        drop_pg("quarry_bench_scale")
    from bench import partitions, streams  # noqa: PLC0415 - they import this module's helpers

    return streams.main([]) or partitions.main([])


def unattended_rows() -> int:
    """The schedule tick, fire time → lease, and merge throughput (bench.schedule, bench.merge)."""
    from bench import merge, schedule  # noqa: PLC0415 - they import this module's helpers

    print()
    code = schedule.main()
    print()
    return code or merge.main()


def extract_rows() -> None:
    """SQL -> Parquet and SQL -> PostgreSQL runs against plain copies; peak worker memory."""
    url = fresh_pg("quarry_bench_extract")
    if url is None:
        return
    print(
        f"\nextraction through a real run ({extract.SLICES} slices, pages of {extract.PAGE:,}) "
        "vs a plain server-side cursor -> writer script"
    )
    try:
        for line in extract.measure(url, REDIS, EXTRACT_ROWS, MEMORY_ROWS):
            row(*line)
    finally:
        drop_pg("quarry_bench_extract")  # 10,000,000-row tables


def api_rows(tmp: Path) -> None:
    """Pages from a 1,000,000-entry store; stream latency; 200 stream clients."""
    print("\nAPI: a page of 1000 entries from 1,000,000 (one run holds 200,000), ms")
    for label, url in (
        ("SQLite", ingest.fresh_sqlite(tmp, "pages.db")),
        ("PostgreSQL", fresh_pg("quarry_bench_pages")),
    ):
        if url is None:
            continue
        for name, through_api, raw in api.pages(url):
            p50 = statistics.median(through_api) / statistics.median(raw)
            p99 = api.pct(through_api, 0.99) / api.pct(raw, 0.99)
            print(
                f"{label + ' ' + name:<40} API {api.summary(through_api):<24} "
                f"raw keyset SQL {api.summary(raw):<24} p50 {p50:.2f}x, p99 {p99:.2f}x "
                "(goal <= 2x)"
            )
    url = fresh_pg("quarry_bench_stream")
    if url is None:
        return
    print(
        "\nstream latency: log call in a worker-like process -> SSE client (writer flush included)"
    )
    for label, redis in (("Redis wake-ups", REDIS), ("polling fallback", "")):
        lags = api.stream_latency(url, redis, clients=1, count=150, interval=0.03)
        print(f"{label:<40} {api.summary(lags[0])}  (goal with Redis: p50 <= 150, p99 <= 300)")
    lags = api.stream_latency(url, REDIS, clients=200, count=100, interval=0.1)
    flat = [x for client in lags for x in client]
    complete = sum(1 for client in lags if len(client) == 101)
    print(
        f"{'200 clients on one API process':<40} {api.summary(flat)}  max {max(flat):.0f} ms; "
        f"{complete}/200 got every entry  (goal: none > 1000 ms behind)"
    )


def recovery_rows(url: str) -> None:
    """Recovery times on real workers, on each broker, against plain dispatch latency."""
    for name, broker in (("Redis", REDIS), ("RabbitMQ", AMQP)):
        print(
            f"\nrecovery on real workers, {name} + PostgreSQL (lease TTL {recovery.TTL:.0f}s, "
            f"renew {recovery.RENEW:.0f}s, watchdog every {recovery.PERIOD:.0f}s)"
        )
        try:
            times = recovery.measure(url, broker)
        except Exception as exc:
            print(f"(no {name}: {exc.__class__.__name__}; figures skipped)")
            continue
        dispatch = statistics.median(times["dispatch"])
        print(
            f"{'publish -> lease_acquired on an idle worker (baseline)':<58} "
            f"{recovery.summary(times['dispatch'])}"
        )
        goals = {
            "sigterm_resume": ("SIGTERM -> resumed on another worker", "goal p50 <= 0.5 s"),
            "sigterm_exit": ("SIGTERM -> worker process exited", "goal <= 5 s"),
            "child_kill_resume": ("pool process SIGKILLed -> resumed", "goal p50 <= 3 s"),
            "sigkill_resume": (
                "whole worker SIGKILLed -> resumed",
                f"goal <= TTL + watchdog + 5 s = {recovery.TTL + recovery.PERIOD + 5:.0f} s",
            ),
        }
        for key, (label, goal) in goals.items():
            ratio = statistics.median(times[key]) / dispatch
            print(f"{label:<58} {recovery.summary(times[key])}  ({ratio:.0f}x dispatch; {goal})")


if __name__ == "__main__":
    sys.exit(main())
