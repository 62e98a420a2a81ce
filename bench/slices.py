"""Per-slice overhead of the runner (fenced checkpoint + its events) against one raw commit."""

from __future__ import annotations

import json
import sqlite3
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg

from bench.ingest import NullStream
from worker import runlog, signals
from worker.attempt import Outcome
from worker.runner import Runner
from worker.runtime import Runtime
from worker.settings import Settings
from worker.store import Store

SLICES = 1000

PIPELINE = """
[pipelines.empty]
source = {{ type = "demo", events_per_slice = 0, profiles = 0, lists = 0 }}
resources = [{{ name = "events", slices = {{ start = "2026-01-01T00:00:00Z", end = {end}, step = "1h" }} }}]
destination = {{ type = "{destination}" }}
"""


def runner_per_slice_ms(url: str, tmp: Path, destination: str) -> float:
    """Milliseconds per empty slice of a real run executed by the runner in-process."""
    tmp.mkdir(parents=True, exist_ok=True)
    pipelines = tmp / f"bench-{destination}.toml"
    end = (datetime(2026, 1, 1, tzinfo=UTC) + timedelta(hours=SLICES)).isoformat()
    pipelines.write_text(PIPELINE.format(end=end, destination=destination))
    settings = Settings(
        data_dir=tmp / "data",
        database_url=url,
        pipelines_file=pipelines,
        log_format="json",
        worker_id="bench",
    )
    runtime = Runtime.create(settings)
    runlog.configure(runtime.sink, log_format="json", stream=NullStream())
    try:
        run = runtime.store.create_run("empty")
        began = time.perf_counter()
        outcome = Runner(runtime, signals.StopFlag()).execute(run.id)
        elapsed = time.perf_counter() - began
    finally:
        runtime.close()
    assert outcome is Outcome.SUCCEEDED, outcome
    store = Store(url)
    completed = len(store.entries(run.id, event="slice_completed", limit=SLICES + 1))
    store.close()
    assert completed == SLICES, completed
    return elapsed / SLICES * 1000


def raw_commit_ms(url: str, n: int = 500) -> float:
    """Milliseconds per durable commit of a checkpoint-sized UPDATE, through the raw driver."""
    store = Store(url)
    run_id = store.create_run("bench-raw").id
    store.close()
    checkpoint = json.dumps({"resources": {"events": {"next_slice": 1, "rows": 0}}})
    if url.startswith("sqlite"):
        conn: Any = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        began = time.perf_counter()
        for _ in range(n):
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("UPDATE runs SET checkpoint = ? WHERE id = ?", (checkpoint, run_id))
            conn.execute("COMMIT")
        elapsed = time.perf_counter() - began
        conn.close()
        return elapsed / n * 1000
    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://")) as pg:
        began = time.perf_counter()
        for _ in range(n):
            pg.execute("UPDATE runs SET checkpoint = %s WHERE id = %s", (checkpoint, run_id))
            pg.commit()
        elapsed = time.perf_counter() - began
    return elapsed / n * 1000
