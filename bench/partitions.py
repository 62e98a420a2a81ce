"""Pages of the flat view and of a run at 20 million entries in 30 daily partitions.

``python -m bench.partitions`` (and the end of ``make bench BENCH_ARGS=scale``):
a PostgreSQL store at head (entries partitioned by day) is loaded in bulk, not
logged: each of 30 days' entries is written with COPY into a table of its own,
which is then attached as that day's partition (PostgreSQL builds its indexes
then, once). 40 runs a day log side by side, so a run's entries are spread over
its day. Each page through the API (``GET /api/v1/logs``, ``GET
/api/v1/action-runs/{id}/logs``, 1,000 entries, fetched on one keep-alive
connection of the standard library's ``http.client`` and decoded with Quarry's
own JSON parser, orjson) is timed alternately with the same keyset query through the raw
driver on the same tables, its rows decoded by the driver.

``--entries N`` loads fewer (a quick look); ``--keep`` leaves the database for
the next call, which then skips the load when it holds as many entries.
"""

from __future__ import annotations

import argparse
import http.client
import io
import os
import statistics
import sys
import time
import urllib.parse
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from sqlalchemy import create_engine, text

from bench.api import COLUMNS, _raw_query, api_env, pct, timed_pair
from tests.acceptance.harness import serve_api
from worker import jsonfmt
from worker.store import Store, partitions
from worker.store.tables import LEVEL_FILTERS

PG_ADMIN = os.environ.get(
    "QUARRY_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
NAME = "quarry_bench_partitions"
DAYS = 30
RUNS_PER_DAY = 40
SAMPLES = 200


def _url() -> str:
    return PG_ADMIN.rsplit("/", 1)[0] + f"/{NAME}"


def _driver(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://")


def _held(url: str) -> int:
    """Entries in the kept database, 0 when there is none."""
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            found = conn.execute(
                text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": NAME}
            ).scalar()
    finally:
        admin.dispose()
    if not found:
        return 0
    with psycopg.connect(_driver(url)) as conn:
        row = conn.execute("SELECT last_value FROM log_entries_id_seq").fetchone()
    return int(row[0]) if row else 0


def _fresh(url: str) -> None:
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{NAME}" WITH (FORCE)'))
            conn.execute(text(f'CREATE DATABASE "{NAME}"'))
    finally:
        admin.dispose()
    store = Store(url)
    store.upgrade()
    store.close()


def _day_lines(first_id: int, day: datetime, runs: list[str], count: int) -> bytes:
    """COPY text for ``count`` entries of ``day``, the runs taking turns, ids from ``first_id``."""
    step = 86_400 / count
    out = io.StringIO()
    write = out.write
    for i in range(count):
        run = runs[i % len(runs)]
        level = "error" if i % 997 == 0 else "warning" if i % 101 == 0 else "info"
        at = (day + timedelta(seconds=i * step)).isoformat()
        n = i // len(runs)
        write(
            f"{first_id + i}\t{run}\t{level}\tslice_completed\tSlice {n}: 500 rows\t"
            f'{{"rows": 500, "slice": {n}, "bytes": 61440}}\tworker-{i % 8}\t1\t{at}\n'
        )
    return out.getvalue().encode()


def load(url: str, entries: int) -> str:
    """Fill the store: 30 days of 40 runs, ``entries`` in all. Returns a run of the middle
    day."""
    today = datetime.now(UTC).date()
    first_day = today - timedelta(days=DAYS - 1)
    per_day = entries // DAYS
    store = Store(url)
    runs_by_day = [
        [store.create_run(f"pipeline-{n}").id for n in range(RUNS_PER_DAY)] for _ in range(DAYS)
    ]
    store.close()
    began = time.perf_counter()
    with psycopg.connect(_driver(url), autocommit=True) as conn:
        conn.execute("SET maintenance_work_mem = '512MB'")
        next_id = 1
        for n in range(DAYS):
            day = first_day + timedelta(days=n)
            name = partitions.day_name("log_entries", day)
            # The migration's (empty) yesterday and today are loaded like the other days.
            conn.execute(f"DROP TABLE IF EXISTS {name}")
            conn.execute(f"CREATE TABLE {name} (LIKE log_entries INCLUDING DEFAULTS)")
            start, end = partitions.day_bounds(day)
            data = _day_lines(next_id, start, runs_by_day[n], per_day)
            with (
                conn.cursor() as cursor,
                cursor.copy(f"COPY {name} (id, {COLUMNS}) FROM STDIN") as copy,
            ):
                copy.write(data)
            conn.execute(
                f"ALTER TABLE log_entries ATTACH PARTITION {name} "
                f"FOR VALUES FROM ('{start.isoformat()}') TO ('{end.isoformat()}')"
            )
            next_id += per_day
            print(
                f"  day {n + 1}/{DAYS} loaded ({time.perf_counter() - began:.0f} s)",
                file=sys.stderr,
            )
        conn.execute("SELECT setval('log_entries_id_seq', %s)", (next_id - 1,))
        conn.execute("ANALYZE log_entries")
    print(
        f"  loaded {per_day * DAYS:,} entries in {time.perf_counter() - began:.0f} s",
        file=sys.stderr,
    )
    return runs_by_day[DAYS // 2][0]


def _flat_raw(url: str):  # type: ignore[no-untyped-def]
    # psycopg as it comes: a query run five times on a connection is prepared (as the
    # store's reads are), so neither side plans the 30-odd partitions for every page.
    pg = psycopg.connect(_driver(url), autocommit=True)

    def run(after: int) -> list[Any]:
        sql = f"SELECT id, {COLUMNS} FROM log_entries WHERE id > %s ORDER BY id LIMIT 1001"
        return pg.execute(sql, (after,)).fetchall()

    return run


def measure(
    url: str, run_id: str, last: int, total: int
) -> list[tuple[str, list[float], list[float]]]:
    """(page, API ms, raw ms) for each page, timed alternately."""
    store = Store(url)
    _, secret = store.create_token("read")
    store.close()
    tmp, env = api_env(url)
    proc, base = serve_api(env, tmp / "api.log")
    flat_raw = _flat_raw(url)
    run_raw = _raw_query(url, run_id, prepare_threshold=5)
    cases = [
        ("flat view, first page", "/api/v1/logs", {}, lambda: flat_raw(0)),
        (
            "flat view, page at the middle",
            "/api/v1/logs",
            {"cursor": str(total // 2)},
            lambda: flat_raw(total // 2),
        ),
        (
            "flat view, page near the newest",
            "/api/v1/logs",
            {"cursor": str(total - 1500)},
            lambda: flat_raw(total - 1500),
        ),
        (
            f"a run's first page (run of day {DAYS // 2 + 1})",
            f"/api/v1/action-runs/{run_id}/logs",
            {},
            lambda: run_raw(0, None),
        ),
        (
            "the run's last page",
            f"/api/v1/action-runs/{run_id}/logs",
            {"cursor": str(last)},
            lambda: run_raw(last, None),
        ),
        (
            "the run's level=warning page",
            f"/api/v1/action-runs/{run_id}/logs",
            {"level": "warning"},
            lambda: run_raw(0, ("warning", "error")),
        ),
    ]
    results = []
    try:
        # The standard library's keep-alive client: httpx's own per-request work was about
        # a tenth of a page's time here, a Python client's cost rather than the API's.
        address = urllib.parse.urlsplit(base)
        client = http.client.HTTPConnection(address.hostname or "", address.port)
        headers = {"Authorization": f"Bearer {secret}"}
        for name, path, params, raw in cases:

            def api_call(path: str = path, params: dict[str, str] = params) -> None:
                client.request("GET", f"{path}?{urllib.parse.urlencode(params)}", headers=headers)
                response = client.getresponse()
                body = jsonfmt.loads(response.read())
                assert response.status == 200 and body["entries"], (path, params)

            results.append((name, *timed_pair(api_call, raw, SAMPLES)))
        client.close()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    return results


def plain_copy(url: str) -> None:
    """The same entries in one plain table, ``plain_entries``, with the indexes the pages use
    (the primary key, ``(run_id, id)`` and the warnings' partial index)."""
    began = time.perf_counter()
    with psycopg.connect(_driver(url), autocommit=True) as conn:
        conn.execute("SET maintenance_work_mem = '512MB'")
        conn.execute("DROP TABLE IF EXISTS plain_entries")
        conn.execute("CREATE TABLE plain_entries AS SELECT * FROM log_entries")
        conn.execute("ALTER TABLE plain_entries ADD PRIMARY KEY (id)")
        conn.execute("CREATE INDEX ON plain_entries (run_id, id)")
        conn.execute(f"CREATE INDEX ON plain_entries (run_id, id) WHERE {LEVEL_FILTERS['warning']}")
        conn.execute("ANALYZE plain_entries")
    print(f"  copied into one plain table in {time.perf_counter() - began:.0f} s", file=sys.stderr)


def against_plain(url: str, run_id: str, total: int) -> list[tuple[str, list[float], list[float]]]:
    """(page, partitioned ms, plain ms): the same keyset queries on both, alternating."""
    pg = psycopg.connect(_driver(url), autocommit=True)
    flat = f"SELECT id, {COLUMNS} FROM {{}} WHERE id > %s ORDER BY id LIMIT 1001"
    per_run = (
        f"SELECT id, {COLUMNS} FROM {{}} WHERE run_id >= %s AND run_id <= %s AND id > %s "
        "ORDER BY run_id, id LIMIT 1001"
    )
    warnings = (
        f"SELECT id, {COLUMNS} FROM {{}} WHERE run_id >= %s AND run_id <= %s AND id > %s "
        f"AND {LEVEL_FILTERS['warning']} ORDER BY run_id, id LIMIT 1001"
    )
    cases = [
        ("flat view, page at the middle", flat, (total // 2,)),
        ("flat view, page near the newest", flat, (total - 1500,)),
        ("a run's first page", per_run, (run_id, run_id, 0)),
        ("the run's level=warning page", warnings, (run_id, run_id, 0)),
    ]
    out = []
    for name, sql, params in cases:

        def on(table: str, sql: str = sql, params: tuple[Any, ...] = params) -> None:
            pg.execute(sql.format(table), params).fetchall()

        out.append(
            (name, *timed_pair(lambda: on("log_entries"), lambda: on("plain_entries"), SAMPLES))
        )
    pg.close()
    return out


def main(argv: list[str] | None = None) -> int:
    """Load (or reuse) the store, time the pages, print the table."""
    parser = argparse.ArgumentParser(prog="python -m bench.partitions")
    parser.add_argument(
        "--entries", type=int, default=int(os.environ.get("BENCH_PARTITION_ENTRIES", "20000000"))
    )
    parser.add_argument("--keep", action="store_true", help="keep the database for the next call")
    parser.add_argument(
        "--plain",
        action="store_true",
        help="also copy the entries into one plain table and time the raw pages on both",
    )
    args = parser.parse_args(argv)
    url = _url()
    total = args.entries // DAYS * DAYS
    try:
        reuse = _held(url) == total
    except psycopg.Error:
        reuse = False
    if not reuse:
        print(f"loading {total:,} entries into {DAYS} daily partitions ...", file=sys.stderr)
        _fresh(url)
        run_id = load(url, total)
    else:
        with psycopg.connect(_driver(url)) as conn:
            run_id = conn.execute(
                "SELECT id FROM runs WHERE pipeline = 'pipeline-0' "
                "ORDER BY created_at, id OFFSET %s LIMIT 1",
                (DAYS // 2,),
            ).fetchone()[0]  # type: ignore[index]
    with psycopg.connect(_driver(url)) as conn:
        parts = conn.execute(
            "SELECT count(*) FROM pg_inherits WHERE inhparent = 'log_entries'::regclass"
        ).fetchone()[0]  # type: ignore[index]
        run_entries = conn.execute(
            "SELECT count(*) FROM log_entries WHERE run_id = %s", (run_id,)
        ).fetchone()[0]  # type: ignore[index]
        # The cursor before the run's last 1,000 entries: its last page is a whole one.
        found = conn.execute(
            "SELECT id FROM log_entries WHERE run_id = %s ORDER BY id DESC OFFSET 1000 LIMIT 1",
            (run_id,),
        ).fetchone()
        last = found[0] if found else 0  # a run of fewer than 1,001 (a small --entries)
    print(
        f"\npages of 1,000 at {total:,} entries in {parts} partitions ({DAYS} loaded days; "
        f"the run holds {run_entries:,}), API vs the raw keyset query, {SAMPLES} each, alternating"
    )
    print(f"{'page':<48} {'API p50/p99 ms':>16} {'raw p50/p99 ms':>16} {'ratio p50':>10}  goal")
    for name, ours, raw in measure(url, run_id, last, total):
        ratio = statistics.median(ours) / statistics.median(raw)
        print(
            f"{name:<48} {pct(ours, 0.5):>7.1f}/{pct(ours, 0.99):<8.1f} "
            f"{pct(raw, 0.5):>7.1f}/{pct(raw, 0.99):<8.1f} {ratio:>9.2f}×  <= 2×"
        )
    if args.plain:
        plain_copy(url)
        print(
            f"\nthe same raw keyset pages on the {parts} partitions and on one plain table "
            f"holding the same {total:,} entries, {SAMPLES} each, alternating"
        )
        print(f"{'page':<48} {'partitioned p50/p99':>20} {'plain p50/p99':>16} {'ratio p50':>10}")
        for name, parted, plain in against_plain(url, run_id, total):
            ratio = statistics.median(parted) / statistics.median(plain)
            print(
                f"{name:<48} {pct(parted, 0.5):>11.1f}/{pct(parted, 0.99):<8.1f} "
                f"{pct(plain, 0.5):>7.1f}/{pct(plain, 0.99):<8.1f} {ratio:>9.2f}×"
            )
    if not args.keep:
        admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{NAME}" WITH (FORCE)'))
        admin.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
