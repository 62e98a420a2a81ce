"""API benchmarks: log pages from a 1,000,000-entry store, stream latency, 200 stream clients."""

from __future__ import annotations

import asyncio
import gc
import json
import multiprocessing as mp
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
from httpx_sse import aconnect_sse

from bench.ingest import NullStream
from tests.acceptance.harness import serve_api
from worker import jsonfmt, runlog
from worker.notify import Publisher
from worker.runlog import EntryWriter, StoreSink
from worker.store import Store
from worker.store.tables import LEVEL_FILTERS

QUARRY = Path(sys.executable).parent / "quarry"
TOTAL, BIG = 1_000_000, 200_000
COLUMNS = "run_id, level, event, message, data, worker_id, attempt, occurred_at"


def populate(url: str) -> tuple[str, list[int]]:
    """1,000,000 entries: one run with 200,000 (10 % warnings or errors), the rest over 40 runs."""
    store = Store(url)
    big = store.create_run("bench-big").id
    others = [store.create_run("bench-other").id for _ in range(40)]
    store.close()
    now = datetime.now(UTC).replace(tzinfo=None).isoformat(" ", "microseconds")
    data = json.dumps({"resource": "events", "slice": 1, "rows": 8500})

    def rows(run_id: str, count: int) -> list[tuple[Any, ...]]:
        levels = ["info"] * 18 + ["warning", "error"]
        return [
            (
                run_id,
                levels[i % 20],
                "slice_completed",
                f"Slice {i}: 8,500 rows",
                data,
                "bench",
                1,
                now,
            )
            for i in range(count)
        ]

    batches = [(big, BIG)] + [(r, (TOTAL - BIG) // len(others)) for r in others]
    if url.startswith("sqlite"):
        conn = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None)
        conn.execute("BEGIN")
        for run_id, count in batches:
            conn.executemany(
                f"INSERT INTO log_entries ({COLUMNS}) VALUES (?,?,?,?,?,?,?,?)", rows(run_id, count)
            )
        conn.execute("COMMIT")
        conn.execute("ANALYZE")
        ids = [
            r[0]
            for r in conn.execute("SELECT id FROM log_entries WHERE run_id = ? ORDER BY id", (big,))
        ]
        conn.close()
        return big, ids
    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://")) as pg:
        with pg.cursor() as cur, cur.copy(f"COPY log_entries ({COLUMNS}) FROM STDIN") as copy:
            for run_id, count in batches:
                for row in rows(run_id, count):
                    copy.write_row(row)
        pg.commit()
        pg.execute("ANALYZE log_entries")
        pg.commit()
        ids = [
            r[0]
            for r in pg.execute("SELECT id FROM log_entries WHERE run_id = %s ORDER BY id", (big,))
        ]
    return big, ids


def api_env(url: str, redis_url: str = "") -> tuple[Path, dict[str, str]]:
    """A scratch directory and the environment of a ``quarry serve`` on ``url``."""
    tmp = Path(tempfile.mkdtemp())
    return tmp, {
        **os.environ,
        "QUARRY_DATABASE_URL": url,
        "QUARRY_DATA_DIR": str(tmp),
        "QUARRY_BROKER_URL": "",
        "QUARRY_REDIS_URL": redis_url,
    }


def timed(fn: Any, n: int, warmup: int = 5) -> list[float]:
    """Milliseconds of ``n`` calls of ``fn``, after ``warmup`` untimed ones."""
    for _ in range(warmup):  # caches, connection pools and the server's first requests
        fn()
    out = []
    for _ in range(n):
        began = time.perf_counter()
        fn()
        out.append((time.perf_counter() - began) * 1000)
    return out


def timed_pair(first: Any, second: Any, n: int, warmup: int = 5) -> tuple[list[float], list[float]]:
    """Milliseconds of ``n`` calls of each, alternating, so both see the same machine.

    Timed one after the other, a noisy second on two shared cores lands in one
    side's tail only; alternating puts it in both.
    """
    for _ in range(warmup):
        first()
        second()
    a, b = [], []
    for _ in range(n):
        began = time.perf_counter()
        first()
        middle = time.perf_counter()
        second()
        a.append((middle - began) * 1000)
        b.append((time.perf_counter() - middle) * 1000)
    return a, b


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def page_store(url: str) -> tuple[Path, dict[str, str], str, list[int], str]:
    """:func:`populate` ``url``; a scratch directory and the environment of an API on it,
    the big run, its entry ids and a read token's secret.
    """
    big, ids = populate(url)
    # The populated rows are gone, the imports stay: out of the collector's sight, so that a
    # full collection of this process's own heap (60-75 ms) lands in no timing.
    gc.collect()
    gc.freeze()
    tmp, env = api_env(url)
    store = Store(url)
    _, secret = store.create_token("read")
    store.close()
    return tmp, env, big, ids, secret


def pages(url: str, samples: int = 200) -> list[tuple[str, list[float], list[float]]]:
    """(page, API ms, raw keyset SQL ms) for the first, last and level=warning pages.

    200 samples a side, so that a p99 is a percentile and not the second-worst of
    forty, taken alternately (:func:`timed_pair`).
    """
    tmp, env, big, ids, secret = page_store(url)
    proc, base = serve_api(env, tmp / "api.log")
    last_cursor = str(ids[-1001])
    cases = {
        "first page": ({}, 0, None),
        "last page": ({"cursor": last_cursor}, int(last_cursor), None),
        "level=warning page": ({"level": "warning"}, 0, ("warning", "error")),
    }
    results = []
    try:
        client = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {secret}"})
        raw = _raw_query(url, big)
        for name, (params, after, levels) in cases.items():

            def api_call(params: dict[str, str] = params) -> None:
                body = client.get(f"/api/v1/action-runs/{big}/logs", params=params).json()
                assert len(body["entries"]) == 1000 or params.get("cursor"), len(body["entries"])

            def raw_call(after: int = after, levels: tuple[str, ...] | None = levels) -> None:
                raw(after, levels)

            results.append((name, *timed_pair(api_call, raw_call, samples)))
        client.close()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    return results


def _raw_query(url: str, run_id: str, prepare_threshold: int | None = None) -> Any:
    """The same keyset query through the raw driver, rows fetched and decoded (on
    PostgreSQL prepared from the ``prepare_threshold``-th call; by default never)."""
    if url.startswith("sqlite"):
        conn = sqlite3.connect(url.removeprefix("sqlite:///"), check_same_thread=False)

        def run(after: int, levels: tuple[str, ...] | None) -> list[Any]:
            if levels:
                # The store's own filter text, so both sides can use the partial index.
                sql = f"SELECT id, {COLUMNS} FROM log_entries WHERE run_id = ? AND id > ? AND {LEVEL_FILTERS['warning']} ORDER BY id LIMIT 1001"
                rows = conn.execute(sql, (run_id, after)).fetchall()
            else:
                sql = f"SELECT id, {COLUMNS} FROM log_entries WHERE run_id = ? AND id > ? ORDER BY id LIMIT 1001"
                rows = conn.execute(sql, (run_id, after)).fetchall()
            return [json.loads(r[5]) for r in rows]

        return run
    pg = psycopg.connect(
        url.replace("postgresql+psycopg://", "postgresql://"),
        autocommit=True,
        prepare_threshold=prepare_threshold,
    )

    def run_pg(after: int, levels: tuple[str, ...] | None) -> list[Any]:
        if levels:
            sql = f"SELECT id, {COLUMNS} FROM log_entries WHERE run_id >= %s AND run_id <= %s AND id > %s AND {LEVEL_FILTERS['warning']} ORDER BY run_id, id LIMIT 1001"
            return pg.execute(sql, (run_id, run_id, after)).fetchall()
        sql = f"SELECT id, {COLUMNS} FROM log_entries WHERE run_id >= %s AND run_id <= %s AND id > %s ORDER BY run_id, id LIMIT 1001"
        return pg.execute(sql, (run_id, run_id, after)).fetchall()

    return run_pg


# -- streams --------------------------------------------------------------------------


def _produce(url: str, run_id: str, count: int, interval: float, redis_url: str) -> None:
    """A worker-like process: log ``count`` entries through structlog and the store writer."""
    store = Store(url)
    if redis_url:
        store.on_entries = Publisher(redis_url)
    writer = EntryWriter(store.append_entries, flush_ms=200, batch_size=2000)
    runlog.configure(StoreSink(writer), log_format="json", stream=NullStream())
    log = runlog.get_logger(run_id=run_id, worker_id="bench").bind(attempt=1)
    writer.start()
    for i in range(count):
        log.info("slice_completed", message=f"Slice {i}", sent_at=time.time())
        time.sleep(interval)
    log.info("run_completed", message="done", sent_at=time.time())
    writer.close()
    store.close()


async def _listen(
    base: str, secret: str, run_id: str, lags: list[float], opened: Callable[[], None]
) -> None:
    headers = {"Authorization": f"Bearer {secret}"}
    path = f"/api/v1/action-runs/{run_id}/logs/stream"
    async with (
        httpx.AsyncClient(base_url=base, headers=headers, timeout=httpx.Timeout(120)) as client,
        aconnect_sse(client, "GET", path) as source,
    ):
        opened()
        async for sse in source.aiter_sse():
            entry = jsonfmt.loads(sse.data)
            lags.append((time.time() - entry["data"]["sent_at"]) * 1000)


def stream_setup(url: str, redis_url: str, pipeline: str) -> tuple[str, str, Path, dict[str, str]]:
    """A run to stream and a read token's secret, with the environment of ``api_env``."""
    store = Store(url)
    store.upgrade()
    run_id = store.create_run(pipeline).id
    _, secret = store.create_token("read")
    store.close()
    tmp, env = api_env(url, redis_url)
    return run_id, secret, tmp, env


def stream_latency(
    url: str, redis_url: str, *, clients: int = 1, count: int = 200, interval: float = 0.05
) -> list[list[float]]:
    """Per client, ms from each log call in a worker-like process to its receipt over SSE."""
    run_id, secret, tmp, env = stream_setup(url, redis_url, "bench-stream")
    proc, base = serve_api(env, tmp / "api.log")
    lags: list[list[float]] = [[] for _ in range(clients)]
    try:

        async def main() -> None:
            ready = asyncio.Event()
            streams = [0]

            def opened() -> None:
                streams[0] += 1
                if streams[0] == clients:
                    ready.set()

            listeners = [
                asyncio.create_task(_listen(base, secret, run_id, lags[i], opened))
                for i in range(clients)
            ]
            # Every stream open before the run starts logging: a fixed sleep was not always
            # long enough on 2 busy cores, and the run then began during the connection storm.
            await asyncio.wait_for(ready.wait(), timeout=60 + clients / 5)
            await asyncio.sleep(0.5)  # and joined to its run's feed
            producer = mp.get_context("fork").Process(
                target=_produce, args=(url, run_id, count, interval, redis_url)
            )
            producer.start()
            await asyncio.gather(*listeners)
            producer.join()

        asyncio.run(main())
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    return lags


def summary(values: list[float]) -> str:
    """p50 / p99 in ms."""
    return f"p50 {statistics.median(values):.1f} ms  p99 {pct(values, 0.99):.1f} ms"
