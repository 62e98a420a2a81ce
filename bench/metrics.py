"""What metrics cost: ``python -m bench.metrics [RUNS]``.

- **A scrape over a large store.** A fresh SQLite store and (when a server
  answers) a fresh PostgreSQL store get ``RUNS`` runs (default 100,000) over 100
  pipelines — nearly all ended, a few running, queued or between attempts — and
  the counter rows those pipelines would have; then the scrape's store read
  (``Store.metrics_snapshot``) and the whole exposition (``generate_latest`` over
  the API's collector) are timed, median of 15, against a plain ``SELECT
  count(*) FROM runs`` on the same store.
- **A checkpoint's counters.** One run's fenced checkpoint commit with a
  ``slice_completed`` entry, without and with its slice's rows and bytes counted
  (``Store.commit(loaded=…)``), alternating, 3,000 of each: the median of each.
"""

from __future__ import annotations

import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from sqlalchemy import create_engine, insert, text

from tests.conftest import PG_ADMIN_URL
from worker.api.metrics import StoreCollector
from worker.models import Lease, Level, NewEntry
from worker.settings import Settings
from worker.store import Store
from worker.store import metrics as m
from worker.store.engine import utcnow
from worker.store.tables import pipeline_metrics, queued_run, runs

PIPELINES = 100
SAMPLES = 15
#: Of every 1,000 runs: their status (the rest succeeded).
OPEN_PER_1000 = {"failed": 40, "cancelled": 10, "running": 2, "queued": 3, "interrupted": 1}


def _median_ms(work: Callable[[], Any]) -> float:
    work()  # warm: connections, caches
    times = []
    for _ in range(SAMPLES):
        start = time.perf_counter()
        work()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def _fill(store: Store, total: int) -> None:
    statuses: list[str] = []
    for status, count in OPEN_PER_1000.items():
        statuses += [status] * count
    statuses += ["succeeded"] * (1000 - len(statuses))
    now = time.time()
    batch: list[dict[str, Any]] = []
    with store.engine.begin() as conn:
        for i in range(total):
            row = queued_run(f"pipeline_{i % PIPELINES:03d}", {}, utcnow())
            row["status"] = statuses[i % 1000]
            # Half the queued runs are between attempts (they started before).
            started = row["status"] != "queued" or i % 2
            row["started_at"] = row["created_at"] if started else None
            batch.append(row)
            if len(batch) == 5000:
                conn.execute(insert(runs), batch)
                batch = []
        if batch:
            conn.execute(insert(runs), batch)
        counters = []
        for p in range(PIPELINES):
            pipeline = f"pipeline_{p:03d}"
            names = [
                (m.STARTED, ""),
                (m.ROWS, ""),
                (m.BYTES, ""),
                (m.LAST_SUCCESS, ""),
                *((m.ENDED, f"status={s}") for s in ("succeeded", "failed", "cancelled")),
                *((m.RECOVERIES, f"kind={k}") for k in ("expired_lease", "fast", "republish")),
                *((m.INTERRUPTIONS, f"kind={k}") for k in ("sigterm", "worker_lost", "retry")),
                *(
                    (f"{m.DURATION}_bucket", f"status=succeeded,le={b:g}")
                    for b in m.DURATION_BUCKETS
                ),
                (f"{m.DURATION}_sum", "status=succeeded"),
                *((f"{m.QUEUE_WAIT}_bucket", f"le={b:g}") for b in m.QUEUE_WAIT_BUCKETS),
                (f"{m.QUEUE_WAIT}_sum", ""),
            ]
            counters += [
                {"pipeline": pipeline, "name": n, "labels": lb, "value": now} for n, lb in names
            ]
        conn.execute(insert(pipeline_metrics), counters)
    if store.dialect == "postgresql":
        with store.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM ANALYZE runs"))
            conn.execute(text("VACUUM ANALYZE pipeline_metrics"))


def _measure(label: str, store: Store, total: int, pipelines_file: Path) -> None:
    _fill(store, total)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StoreCollector(store, Settings(pipelines_file=pipelines_file)))

    def count() -> None:
        with store._reader.connect() as conn:
            conn.execute(text("SELECT count(*) FROM runs")).scalar()

    baseline = _median_ms(count)
    snapshot = _median_ms(store.metrics_snapshot)
    scrape = _median_ms(lambda: generate_latest(registry))
    size = len(generate_latest(registry))
    print(
        f"{label:<11} {total:>7,} runs | snapshot {snapshot:6.1f} ms | whole scrape "
        f"{scrape:6.1f} ms ({size:,} bytes) | SELECT count(*) FROM runs {baseline:6.1f} ms"
    )


@contextmanager
def _postgres() -> Iterator[str | None]:
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"quarry_bench_metrics_{secrets.token_hex(3)}"
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception:
        admin.dispose()
        yield None
        return
    try:
        yield f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _commit_cost(label: str, store: Store) -> None:
    run = store.create_run("p")
    lease = store.acquire(run.id, "w", 3600)
    assert isinstance(lease, Lease)

    def once(loaded: tuple[int, int] | None) -> float:
        done = NewEntry(run.id, Level.INFO, "slice_completed", "m", utcnow(), {"rows": 10})
        start = time.perf_counter()
        store.commit(lease, [done], checkpoint={"n": 1}, summary={"rows_loaded": 1}, loaded=loaded)
        return (time.perf_counter() - start) * 1000

    for _ in range(200):
        once(None)
        once((10, 100))
    plain, counted = [], []
    for _ in range(3000):
        plain.append(once(None))
        counted.append(once((10, 100)))
    print(
        f"{label:<11} checkpoint commit {statistics.median(plain):.3f} ms | with its rows "
        f"and bytes counted {statistics.median(counted):.3f} ms"
    )


def main() -> None:
    """Fill, then time the scrape and a checkpoint's counters on each database."""
    total = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    with tempfile.TemporaryDirectory() as tmp:
        pipelines_file = Path(tmp) / "none.toml"  # only the store's pipelines
        store = Store(f"sqlite:///{Path(tmp) / 'quarry.db'}")
        store.upgrade()
        _measure("SQLite", store, total, pipelines_file)
        _commit_cost("SQLite", store)
        store.close()
        with _postgres() as url:
            if url is None:
                print("PostgreSQL: no server, skipped")
                return
            store = Store(url)
            store.upgrade()
            _measure("PostgreSQL", store, total, pipelines_file)
            _commit_cost("PostgreSQL", store)
            store.close()


if __name__ == "__main__":
    main()
