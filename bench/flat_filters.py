"""The flat view's filters on PostgreSQL, 300,000 entries: ``python -m bench.flat_filters``.

A page of 1000 entries with no filter against pages whose ``event``,
``worker_id`` or ``pipeline`` filter matches nothing, with the filter indexes
of migration 0006 and then without them (dropped in the same run): the
keyset query walks entries in id order, so a filter with no index behind it
reads the whole table before it can answer "nothing".
"""

from __future__ import annotations

import secrets
import statistics
import time
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import create_engine, text

from tests.conftest import PG_ADMIN_URL
from worker.models import Level, NewEntry
from worker.store import Store

RUNS = 30
PER_RUN = 10_000
SAMPLES = 15


def _median_ms(store: Store, **filters: Any) -> float:
    times = []
    for _ in range(SAMPLES):
        start = time.perf_counter()
        store.entry_page_json(None, after_id=0, limit=1000, **filters)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def _row(store: Store, label: str) -> None:
    print(
        f"{label:<16} first page {_median_ms(store):6.1f} ms | event=nope "
        f"{_median_ms(store, event='nope'):6.1f} ms | worker_id=nope "
        f"{_median_ms(store, worker_id='nope'):6.1f} ms | pipeline=nope "
        f"{_median_ms(store, pipeline='nope'):6.1f} ms"
    )


def main() -> None:
    """Fill a fresh database, time the pages, drop the indexes, time them again."""
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"quarry_bench_flat_{secrets.token_hex(3)}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    store = Store(f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{name}")
    try:
        store.upgrade()
        now = datetime.now(UTC)
        for k in range(RUNS):
            run_id = store.create_run("demo").id
            store.append_entries(
                [
                    NewEntry(
                        run_id, Level.INFO, "slice_completed", f"m{i}", now, {"i": i}, f"w{k % 3}"
                    )
                    for i in range(PER_RUN)
                ]
            )
        with store.engine.begin() as conn:
            conn.execute(text("ANALYZE"))
        _row(store, "with indexes")
        with store.engine.begin() as conn:
            conn.execute(text("DROP INDEX ix_log_entries_event_id"))
            conn.execute(text("DROP INDEX ix_log_entries_worker_id_id"))
        _row(store, "without them")
    finally:
        store.close()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


if __name__ == "__main__":
    main()
