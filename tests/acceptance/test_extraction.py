"""Real extraction end to end: real workers, SIGTERM and SIGKILL mid-run, row-by-row checks.

PostgreSQL table -> Parquet files, and a local HTTP API -> PostgreSQL table. Each
run is interrupted gracefully (SIGTERM to worker a: ``run_interrupted``, resumed by
b), then hard (SIGKILL to b: lease expiry, ``watchdog_recovery``, resumed by c).
Then the destination is compared with the source row by row: nothing missing,
nothing twice, and no slice completed twice.
"""

from __future__ import annotations

import collections
import secrets
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pyarrow.parquet as pq
import pytest

from tests.acceptance.harness import Cluster, WorkerProcess, temp_files, wait_for
from tests.crm_api import CrmServer, contact
from tests.extract.conftest import load_orders
from worker.models import Status

pytestmark = pytest.mark.acceptance

#: Secrets planted through ${ENV} references: they must appear nowhere a run writes.
PG_SECRET = "pg-Canary-" + secrets.token_hex(6)
CRM_TOKEN = "crm-Canary-" + secrets.token_hex(8)

ORDERS = 3000  # one a minute from 2026-01-01 00:00: 50 hours, 10 slices of 5 h


def conninfo(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://")


def with_password(url: str) -> str:
    # Trust auth ignores the password, so the canary rides along in a working DSN.
    return url.replace("postgres@", "postgres:${E2E_PG_PASSWORD}@")


@pytest.fixture
def cluster(tmp_path: Path, pg_url: str, redis_url: str) -> Iterator[Cluster]:
    c = Cluster(tmp_path, database_url=pg_url, broker_url=redis_url)
    c.env["E2E_PG_PASSWORD"] = PG_SECRET
    c.env["CRM_TOKEN"] = CRM_TOKEN
    c.beat()
    yield c
    c.close()


def add_pipelines(cluster: Cluster, text: str) -> None:
    with cluster.pipelines_file.open("a") as fh:
        fh.write("\n" + text)


def slice_counts(cluster: Cluster, run_id: str) -> collections.Counter[int]:
    return collections.Counter(
        e.data["slice"] for e in cluster.entries(run_id) if e.event == "slice_completed"
    )


def interrupt_twice(cluster: Cluster, run_id: str, a: WorkerProcess) -> list[str]:
    """SIGTERM a after 2 slices; b resumes; SIGKILL b after 2 more; c finishes."""
    wait_for(lambda: len(slice_counts(cluster, run_id)) >= 2, "two slices", 120)
    a.signal_group(signal.SIGTERM)
    wait_for(lambda: a.proc.poll() is not None, "worker a to exit", 60)
    b = cluster.worker("b")
    before = len(slice_counts(cluster, run_id))
    wait_for(lambda: len(slice_counts(cluster, run_id)) >= before + 2, "b to resume", 120)
    b.signal_group(signal.SIGKILL)
    cluster.worker("c")
    run = cluster.wait_status(
        run_id, Status.SUCCEEDED, Status.FAILED, Status.CANCELLED, timeout=240
    )
    assert run.status is Status.SUCCEEDED, run.error_summary
    events = [e.event for e in cluster.entries(run_id)]
    assert "run_interrupted" in events and "watchdog_recovery" in events
    owners = [e.worker_id for e in cluster.entries(run_id) if e.event == "lease_acquired"]
    assert owners == ["a", "b", "c"]
    assert set(slice_counts(cluster, run_id).values()) == {1}  # no slice committed twice
    return events


def assert_no_canary(cluster: Cluster, run_id: str, *canaries: str) -> None:
    run = cluster.store.get_run(run_id)
    stored = repr(run) + "".join(repr(e) for e in cluster.entries(run_id))
    logs = "".join(w.log() for w in cluster.workers)
    for canary in canaries:
        assert canary not in stored
        assert canary not in logs


def test_postgres_table_to_parquet_survives_sigterm_and_sigkill(
    cluster: Cluster, pg_url: str
) -> None:
    """Every source row lands in exactly one Parquet file, with its values, after two interruptions."""
    load_orders(pg_url, ORDERS)
    # pg_sleep in the select list paces the read (about 0.6 s a slice) after the window's
    # own filter, so the run lasts long enough to interrupt twice.
    add_pipelines(
        cluster,
        f'''
[pipelines.pg_parquet.source]
type = "sql"
url = "{with_password(pg_url)}"
page_size = 50

[[pipelines.pg_parquet.resources]]
name = "orders"
slices = {{ start = 2026-01-01T00:00:00Z, end = 2026-01-03T02:00:00Z, step = "5h" }}
[pipelines.pg_parquet.resources.options]
query = "SELECT o.*, pg_sleep(0.003)::text AS pace FROM src_orders o WHERE o.created_at >= :window_start AND o.created_at < :window_end"
columns = ["id", "created_at", "customer", "amount", "paid", "note"]

[pipelines.pg_parquet.destination]
type = "files"
format = "parquet"
''',
    )
    a = cluster.worker("a")
    run_id = cluster.trigger("pg_parquet")
    interrupt_twice(cluster, run_id, a)
    files = sorted(
        (cluster.data_dir / "output" / "pg_parquet" / run_id / "orders").glob("*.parquet")
    )
    assert len(files) == 10
    written = [row for f in files for row in pq.read_table(f).to_pylist()]
    with (
        psycopg.connect(conninfo(pg_url)) as conn,
        conn.cursor(row_factory=psycopg.rows.dict_row) as cur,
    ):
        expected = cur.execute(
            "SELECT id, created_at, customer, amount, paid, note FROM src_orders ORDER BY id"
        ).fetchall()
    assert len(written) == ORDERS
    assert sorted(written, key=lambda r: r["id"]) == expected
    assert temp_files(cluster) == [] and not list((cluster.data_dir / "output").rglob("*.tmp*"))
    assert_no_canary(cluster, run_id, PG_SECRET)


@pytest.fixture
def crm() -> Iterator[CrmServer]:
    server = CrmServer(token=CRM_TOKEN, total=ORDERS).start()
    server.delay = 0.03
    server.rate_limit_every, server.retry_after = 13, "1"
    server.error_every = 17
    yield server
    server.stop()


def test_http_api_to_postgres_table_survives_sigterm_and_sigkill(
    cluster: Cluster, pg_url: str, crm: CrmServer
) -> None:
    """Rate-limited, failing API pages: every record lands in the table exactly once."""
    schema = f"e2e_{secrets.token_hex(4)}"
    add_pipelines(
        cluster,
        f'''
[pipelines.crm_pg.source]
type = "http"
base_url = "{crm.url}"
headers = {{ Authorization = "Bearer ${{CRM_TOKEN}}" }}
backoff_seconds = 0.2

[[pipelines.crm_pg.resources]]
name = "contacts"
slices = {{ start = 2026-01-01T00:00:00Z, end = 2026-01-03T03:00:00Z, step = "5h" }}
[pipelines.crm_pg.resources.options]
path = "/v1/contacts"
records = "data"
params = {{ limit = 25 }}
pagination = {{ type = "cursor", cursor_path = "meta.next_cursor" }}
window_params = {{ start = "updated_since", end = "updated_before" }}

[pipelines.crm_pg.destination]
type = "sql"
url = "{with_password(pg_url)}"
schema = "{schema}"
table = "crm_{{resource}}"
''',
    )
    a = cluster.worker("a")
    run_id = cluster.trigger("crm_pg")
    interrupt_twice(cluster, run_id, a)
    with (
        psycopg.connect(conninfo(pg_url)) as conn,
        conn.cursor(row_factory=psycopg.rows.dict_row) as cur,
    ):
        rows = cur.execute(
            f'SELECT id, email, name, score, updated_at, _quarry_run_id FROM "{schema}".crm_contacts ORDER BY id'
        ).fetchall()
        conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
    assert len(rows) == ORDERS
    assert {r.pop("_quarry_run_id") for r in rows} == {run_id}
    assert rows == [contact(n) for n in range(1, ORDERS + 1)]
    retries = [e for e in cluster.entries(run_id) if e.event == "source_retry"]
    assert retries and all(e.level == "warning" for e in retries)
    assert {e.data["problem"] for e in retries} <= {"HTTP 429", "HTTP 503"}
    assert_no_canary(cluster, run_id, CRM_TOKEN, PG_SECRET)


def test_incremental_runs_read_only_new_rows(cluster: Cluster, pg_url: str) -> None:
    """The second run starts at the first run's high-water mark: only the new rows move."""
    load_orders(pg_url, 1000)
    schema = f"e2e_{secrets.token_hex(4)}"
    add_pipelines(
        cluster,
        f'''
[pipelines.incr.source]
type = "sql"
url = "{pg_url}"

[[pipelines.incr.resources]]
name = "orders"
options = {{ table = "src_orders", cursor_column = "id" }}

[pipelines.incr.destination]
type = "sql"
url = "{pg_url}"
schema = "{schema}"
''',
    )
    cluster.worker("a")
    first = cluster.trigger("incr")
    assert cluster.wait_status(first, Status.SUCCEEDED, Status.FAILED).status is Status.SUCCEEDED
    with psycopg.connect(conninfo(pg_url), autocommit=True) as conn:
        conn.execute(
            "INSERT INTO src_orders (id, created_at, customer, amount, paid)"
            " SELECT g, now(), 'late', 1, false FROM generate_series(1000, 1199) g"
        )
    second = cluster.trigger("incr")
    run = cluster.wait_status(second, Status.SUCCEEDED, Status.FAILED)
    assert run.status is Status.SUCCEEDED, run.error_summary
    assert run.checkpoint["resources"]["orders"]["since"] == 999
    assert run.checkpoint["resources"]["orders"]["high_water"] == 1199
    with psycopg.connect(conninfo(pg_url)) as conn:
        counts: dict[str, Any] = dict(
            conn.execute(
                f'SELECT _quarry_run_id, count(*) FROM "{schema}".orders GROUP BY 1'
            ).fetchall()
        )
        conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
        conn.commit()
    assert counts == {first: 1000, second: 200}


def test_an_unset_secret_reference_fails_the_run_naming_it(cluster: Cluster, pg_url: str) -> None:
    """A missing environment variable is a clear run_failed, not a connection attempt."""
    add_pipelines(
        cluster,
        """
[pipelines.nosecret.source]
type = "sql"
url = "postgresql+psycopg://etl:${QUARRY_E2E_UNSET_VAR}@127.0.0.1/x"

[[pipelines.nosecret.resources]]
name = "orders"
options = { table = "src_orders" }
""",
    )
    cluster.worker("a")
    run_id = cluster.trigger("nosecret")
    run = cluster.wait_status(run_id, Status.FAILED, Status.SUCCEEDED)
    assert run.status is Status.FAILED
    assert run.error_summary == "source.url: environment variable QUARRY_E2E_UNSET_VAR is not set"
    assert cluster.entries(run_id)[-1].event == "run_failed"
