"""Write modes end to end: a SQL source of 300,000 rows loaded twice into PostgreSQL tables and
Parquet file sets, with rows changed, flagged deleted and removed between the runs and one
run SIGKILLed mid-slice. The destination must equal what each mode promises, row by row."""

from __future__ import annotations

import os
import secrets
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pyarrow.parquet as pq
import pytest

from tests.acceptance.harness import Cluster, wait_for
from worker.models import Status

pytestmark = pytest.mark.acceptance

ROWS = int(os.environ.get("QUARRY_TEST_WRITE_MODE_ROWS", "300000"))
ENDED = (Status.SUCCEEDED, Status.FAILED, Status.CANCELLED)
Row = tuple[int, str, int, bool]


def conninfo(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://")


@pytest.fixture
def cluster(tmp_path: Path, pg_url: str, redis_url: str) -> Iterator[Cluster]:
    c = Cluster(tmp_path, database_url=pg_url, broker_url=redis_url)
    c.beat()
    yield c
    c.close()


def source_rows(conn: psycopg.Connection[Any]) -> dict[int, Row]:
    rows = conn.execute("SELECT id, value, version, deleted FROM wm_src").fetchall()
    return {r[0]: (r[0], r[1], r[2], r[3]) for r in rows}


def table_rows(conn: psycopg.Connection[Any], schema: str, table: str) -> list[tuple[Any, ...]]:
    return conn.execute(
        f'SELECT id, value, version, deleted, _quarry_run_id FROM "{schema}"."{table}" ORDER BY id'
    ).fetchall()


def parquet_rows(root: Path) -> list[Row]:
    files = sorted(root.resolve().glob("*.parquet"))
    rows = [r for f in files for r in pq.read_table(f).to_pylist()]
    return sorted((r["id"], r["value"], r["version"], r["deleted"]) for r in rows)


def pipelines(pg_url: str, schema: str, output: Path) -> str:
    source = f'source = {{ type = "sql", url = "{pg_url}", page_size = 5000 }}'
    slices = f"slices = {{ start = 0, end = {ROWS}, step = {max(ROWS // 12, 1)} }}"
    options = 'options = { table = "wm_src", slice_column = "id" }'
    sql = f'destination = {{ type = "sql", url = "{pg_url}", schema = "{schema}", table = "%s" }}'
    files = f'destination = {{ type = "files", format = "parquet", path = "{output}" }}'
    modes = {
        "append": 'write_mode = "append"',
        "replace": 'write_mode = "replace"',
        "merge": 'write_mode = "merge", primary_key = "id", hard_delete = "deleted"',
    }
    text = ""
    for mode, spec in modes.items():
        text += (
            f"[pipelines.sql_{mode}]\n{source}\n"
            f'resources = [{{ name = "items", {slices}, {options}, {spec} }}]\n'
            f"{sql % ('items_' + mode)}\n\n"
        )
    for mode in ("replace", "merge"):
        text += (
            f"[pipelines.pq_{mode}]\n{source}\n"
            f'resources = [{{ name = "items", {slices}, {options}, {modes[mode]} }}]\n'
            f"{files}\n\n"
        )
    return text


def run_all(cluster: Cluster, names: list[str]) -> dict[str, str]:
    runs = {name: cluster.trigger(name) for name in names}
    for name, run_id in runs.items():
        run = cluster.wait_status(run_id, *ENDED, timeout=300)
        assert run.status is Status.SUCCEEDED, f"{name}: {run.error_summary}"
    return runs


def test_each_write_mode_lands_what_it_promises_across_two_runs_and_a_sigkill(
    cluster: Cluster, pg_url: str, tmp_path: Path
) -> None:
    schema = f"wm_{secrets.token_hex(4)}"
    output = tmp_path / "files"
    with psycopg.connect(conninfo(pg_url), autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS wm_src")
        conn.execute(
            "CREATE TABLE wm_src (id int PRIMARY KEY, value text, version int, deleted bool)"
        )
        conn.execute(
            "INSERT INTO wm_src SELECT g, md5(g::text), 1, false FROM generate_series(0, %s) g",
            (ROWS - 1,),
        )
        first_source = source_rows(conn)
    cluster.pipelines_file.write_text(pipelines(pg_url, schema, output))
    names = ["sql_append", "sql_replace", "sql_merge", "pq_replace", "pq_merge"]
    workers = [cluster.worker("a"), cluster.worker("b")]
    first = run_all(cluster, names)

    with psycopg.connect(conninfo(pg_url), autocommit=True) as conn:
        conn.execute("UPDATE wm_src SET value = 'changed ' || id, version = 2 WHERE id % 10 = 0")
        conn.execute("UPDATE wm_src SET deleted = true, version = 3 WHERE id % 100 = 1")
        conn.execute("DELETE FROM wm_src WHERE id % 100 = 2")
        second_source = source_rows(conn)

    # A reader polls the replaced table through the whole second run: it must only ever see
    # the first run's complete table or the second run's.
    seen: set[tuple[int, int, str | None]] = set()
    stop = threading.Event()

    def poll() -> None:
        with psycopg.connect(conninfo(pg_url), autocommit=True) as conn:
            while not stop.is_set():
                count, runs, run = conn.execute(
                    f'SELECT count(*), count(DISTINCT _quarry_run_id), min(_quarry_run_id) FROM "{schema}".items_replace'
                ).fetchone()  # type: ignore[misc]
                seen.add((count, runs, run))

    reader = threading.Thread(target=poll, daemon=True)
    reader.start()

    # The merge run's worker is SIGKILLed mid-slice; another worker resumes it.
    merged = cluster.trigger("sql_merge")
    wait_for(
        lambda: sum(e.event == "slice_completed" for e in cluster.entries(merged)) >= 3,
        "three merged slices",
        120,
    )
    holder = cluster.store.get_run(merged).lease_owner
    victim = next(w for w in workers if w.name == holder)
    for child in victim.children():
        os.kill(child, signal.SIGKILL)
    run = cluster.wait_status(merged, *ENDED, timeout=300)
    assert run.status is Status.SUCCEEDED, run.error_summary
    assert "watchdog_recovery" in [e.event for e in cluster.entries(merged)]
    second = {"sql_merge": merged, **run_all(cluster, [n for n in names if n != "sql_merge"])}
    stop.set()
    reader.join(timeout=10)

    # What each mode promises, from the two source snapshots.
    merged_rows = {**first_source, **second_source}
    merged_expected = sorted(r for r in merged_rows.values() if not r[3])
    replaced_expected = sorted(second_source.values())
    with psycopg.connect(conninfo(pg_url), autocommit=True) as conn:
        appended = table_rows(conn, schema, "items_append")
        replaced = table_rows(conn, schema, "items_replace")
        upserted = table_rows(conn, schema, "items_merge")
        conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
        conn.execute("DROP TABLE wm_src")

    # append: both runs' rows, each run's exactly once.
    by_run: dict[str, list[Row]] = {}
    for row in appended:
        by_run.setdefault(row[4], []).append(row[:4])
    assert sorted(by_run[first["sql_append"]]) == sorted(first_source.values())
    assert sorted(by_run[second["sql_append"]]) == sorted(second_source.values())
    assert len(by_run) == 2
    # replace: exactly the second run's rows, and no reader saw a mix.
    assert [r[:4] for r in replaced] == replaced_expected
    assert {r[4] for r in replaced} == {second["sql_replace"]}
    assert seen <= {
        (len(first_source), 1, first["sql_replace"]),
        (len(second_source), 1, second["sql_replace"]),
    }
    assert (len(second_source), 1, second["sql_replace"]) in seen
    # merge: one row per key with the latest values; flagged keys gone; vanished keys kept.
    assert [r[:4] for r in upserted] == merged_expected
    # The same on Parquet file sets, read where the docs say: <pipeline>/latest/<resource>.
    assert parquet_rows(output / "pq_replace" / "latest" / "items") == replaced_expected
    assert parquet_rows(output / "pq_merge" / "latest" / "items") == merged_expected
