"""Log ingestion and log-call cost, each against a raw baseline measured in the same run."""

from __future__ import annotations

import io
import json
import multiprocessing as mp
import sqlite3
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import structlog

from worker import runlog
from worker.runlog import EntryWriter, StoreSink
from worker.store import Store

COLUMNS = "run_id, level, event, message, data, worker_id, attempt, occurred_at"


class NullStream(io.StringIO):
    """A sink that keeps nothing (stdout rendering is measured, its I/O is not)."""

    def write(self, s: str) -> int:
        """Drop ``s``."""
        return len(s)


def _produce(url: str, run_id: str, count: int, start: Any, done: Any) -> None:
    """One worker-like process: structlog → sink → writer → store, for one run."""
    store = Store(url)
    writer = EntryWriter(store.entry_flusher(), flush_ms=200, batch_size=2000)
    runlog.configure(StoreSink(writer), log_format="json", stream=NullStream())
    log = runlog.get_logger(run_id=run_id, worker_id="bench").bind(attempt=1)
    writer.start()
    start.wait()
    for i in range(count):
        log.info(
            "slice_completed",
            message=f"Slice {i}/{count}: 8,500 rows",
            resource="events",
            slice=i,
            rows=8500,
        )
    writer.close()
    store.close()
    done.put(run_id)


def ingest_through_quarry(url: str, runs: int, per_run: int) -> float:
    """Entries/s through structlog and the store writer from ``runs`` concurrent processes."""
    store = Store(url)
    run_ids = [store.create_run("bench").id for _ in range(runs)]
    ctx = mp.get_context("fork")
    start, done = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_produce, args=(url, r, per_run, start, done)) for r in run_ids]
    for p in procs:
        p.start()
    time.sleep(0.5)  # every producer is connected and waiting
    began = time.perf_counter()
    start.set()
    for _ in procs:
        done.get(timeout=600)
    elapsed = time.perf_counter() - began
    for p in procs:
        p.join()
    stored = sum(store.count_entries(r) for r in run_ids)
    store.close()
    assert stored == runs * per_run, f"lost entries: {stored} of {runs * per_run}"
    return stored / elapsed


def _raw_rows(run_id: str, count: int) -> list[tuple[Any, ...]]:
    now = datetime.now(UTC).replace(tzinfo=None).isoformat(" ", "microseconds")
    data = json.dumps({"resource": "events", "slice": 1, "rows": 8500})
    return [
        (run_id, "info", "slice_completed", f"Slice {i}: 8,500 rows", data, "bench", 1, now)
        for i in range(count)
    ]


def _raw_sqlite(url: str, total: int, write: Callable[[Any, list[tuple[Any, ...]]], None]) -> float:
    """Rows/s of ``write(conn, rows)`` on sqlite3, 1000 pre-built rows a commit, into the
    store's table."""
    store = Store(url)
    run_id = store.create_run("bench-raw").id
    store.close()
    rows = _raw_rows(run_id, total)
    conn = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    began = time.perf_counter()
    for i in range(0, total, 1000):
        conn.execute("BEGIN")
        write(conn, rows[i : i + 1000])
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - began
    conn.close()
    return total / elapsed


def raw_sqlite_executemany(url: str, total: int) -> float:
    """Rows/s of sqlite3 executemany, 1000 rows a commit, into the same table."""
    sql = f"INSERT INTO log_entries ({COLUMNS}) VALUES (?,?,?,?,?,?,?,?)"
    return _raw_sqlite(url, total, lambda conn, rows: conn.executemany(sql, rows))


def raw_sqlite_multirow(url: str, total: int) -> float:
    """Rows/s of one multi-row INSERT of 1000 rows a commit (sqlite3), into the same table:
    the statement shape the store's flush uses, without anything around it."""
    values = ", ".join(["(?,?,?,?,?,?,?,?)"] * 1000)
    sql = f"INSERT INTO log_entries ({COLUMNS}) VALUES {values}"
    return _raw_sqlite(
        url, total, lambda conn, rows: conn.execute(sql, [v for row in rows for v in row])
    )


def _pg_conn(url: str) -> Any:
    return psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"))


def raw_pg_executemany(url: str, total: int) -> float:
    """Rows/s of psycopg executemany, 1000 rows a commit."""
    store = Store(url)
    run_id = store.create_run("bench-raw").id
    store.close()
    rows = _raw_rows(run_id, total)
    with _pg_conn(url) as conn:
        sql = f"INSERT INTO log_entries ({COLUMNS}) VALUES (%s,%s,%s,%s,%s,%s,%s,%s)"
        began = time.perf_counter()
        for i in range(0, total, 1000):
            with conn.cursor() as cur:
                cur.executemany(sql, rows[i : i + 1000])
            conn.commit()
        elapsed = time.perf_counter() - began
    return total / elapsed


def raw_pg_copy(url: str, total: int) -> float:
    """Rows/s of COPY FROM STDIN, 1000 rows a commit."""
    store = Store(url)
    run_id = store.create_run("bench-raw").id
    store.close()
    rows = _raw_rows(run_id, total)
    with _pg_conn(url) as conn:
        began = time.perf_counter()
        for i in range(0, total, 1000):
            with conn.cursor() as cur, cur.copy(f"COPY log_entries ({COLUMNS}) FROM STDIN") as copy:
                for row in rows[i : i + 1000]:
                    copy.write_row(row)
            conn.commit()
        elapsed = time.perf_counter() - began
    return total / elapsed


def _per_call(fn: Callable[[int], None], n: int) -> float:
    fn(1000)  # warm caches (structlog caches the bound logger on first use)
    began = time.perf_counter()
    fn(n)
    return (time.perf_counter() - began) / n * 1e6


def log_call_cost(n: int = 200_000) -> dict[str, float]:
    """µs per log call: Quarry's hot path (scrub + entry + hand-off + render) vs plain structlog JSON."""
    results: dict[str, float] = {}
    structlog.reset_defaults()
    structlog.configure(
        processors=[structlog.processors.JSONRenderer()],
        logger_factory=structlog.WriteLoggerFactory(file=NullStream()),
        wrapper_class=structlog.make_filtering_bound_logger(20),
        cache_logger_on_first_use=True,
    )
    plain = structlog.get_logger().bind(run_id="r", worker_id="w", attempt=1)

    def plain_calls(k: int) -> None:
        for i in range(k):
            plain.info(
                "slice_completed",
                message="Slice 1/104: 8,500 rows",
                resource="events",
                slice=i,
                rows=8500,
            )

    results["structlog JSON to a null sink (baseline)"] = _per_call(plain_calls, n)
    for fmt in ("json", "console"):
        writer = EntryWriter(lambda entries: set(), flush_ms=10**9, batch_size=10**9)
        runlog.configure(StoreSink(writer), log_format=fmt, stream=NullStream())
        log = runlog.get_logger(run_id="r", worker_id="w").bind(attempt=1, epoch=1)

        def quarry_calls(k: int, log: Any = log, writer: EntryWriter = writer) -> None:
            for i in range(k):
                log.info(
                    "slice_completed",
                    message="Slice 1/104: 8,500 rows",
                    resource="events",
                    slice=i,
                    rows=8500,
                )
            writer.take()

        results[f"quarry log call, store hand-off + {fmt} stdout"] = _per_call(quarry_calls, n)
    structlog.reset_defaults()
    return results


def fresh_sqlite(tmp: Path, name: str) -> str:
    """A new, migrated SQLite store."""
    url = f"sqlite:///{tmp / name}"
    store = Store(url)
    store.upgrade()
    store.close()
    return url
