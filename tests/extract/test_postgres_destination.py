"""The sql destination on a real PostgreSQL: one transaction per slice, fenced by epoch."""

from __future__ import annotations

import threading
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import psycopg
import pytest

from tests.acceptance.harness import wait_for
from tests.extract.conftest import RecordingLog
from worker.destinations import SliceKey, build_destination
from worker.destinations.postgres import PostgresDestination
from worker.errors import ConfigError, DestinationError, LeaseLost
from worker.sources.base import RowPage


def key(index: int = 1, epoch: int = 1, run: str = "run_1") -> SliceKey:
    return SliceKey("pipe", run, "orders", index, epoch)


def write(d: PostgresDestination, k: SliceKey, rows: list[dict[str, Any]], log: Any = None) -> None:
    staged = d.stage(k, log or RecordingLog())
    try:
        staged.write(rows)
        staged.seal()
        staged.publish()
    except BaseException:
        staged.discard()
        raise


def table(
    d: PostgresDestination, look: psycopg.Connection[Any], order: str = "id"
) -> list[tuple[Any, ...]]:
    return look.execute(
        f'SELECT _quarry_run_id, _quarry_slice, id FROM "{d.config.db_schema}".raw_orders ORDER BY {order}'
    ).fetchall()


def test_the_table_is_created_with_types_from_the_rows(
    target: tuple[PostgresDestination, psycopg.Connection[Any]],
) -> None:
    """Python types become column types; the values come back equal."""
    d, look = target
    row = {
        "id": 1, "amount": Decimal("12.50"), "ratio": 0.5, "ok": True, "name": "Ada",
        "at": datetime(2026, 1, 1, 12, tzinfo=UTC), "day": date(2026, 1, 2), "meta": {"k": [1, 2]},
        "blob": b"\x00\x01", "nothing": None,
    }  # fmt: skip
    write(d, key(), [row])
    types = dict(look.execute(
        "SELECT column_name, data_type FROM information_schema.columns WHERE table_schema = %s AND table_name = 'raw_orders'",
        (d.config.db_schema,),
    ).fetchall())  # fmt: skip
    assert types == {
        "_quarry_run_id": "text", "_quarry_slice": "integer", "_quarry_loaded_at": "timestamp with time zone",
        "id": "bigint", "amount": "numeric", "ratio": "double precision", "ok": "boolean", "name": "text",
        "at": "timestamp with time zone", "day": "date", "meta": "jsonb", "blob": "bytea", "nothing": "text",
    }  # fmt: skip
    got = look.execute(
        f'SELECT id, amount, ratio, ok, name, at, day, meta, blob, nothing FROM "{d.config.db_schema}".raw_orders'
    ).fetchone()
    assert got is not None
    assert got[:7] == (1, Decimal("12.50"), 0.5, True, "Ada", row["at"], row["day"])
    assert got[7:] == ({"k": [1, 2]}, b"\x00\x01", None)


def test_a_redone_slice_replaces_its_rows_and_other_slices_stay(
    target: tuple[PostgresDestination, psycopg.Connection[Any]],
) -> None:
    """Slice 1 written twice (a resumed run) holds the second attempt's rows only."""
    d, look = target
    write(d, key(1, epoch=1), [{"id": 1}, {"id": 2}])
    write(d, key(2, epoch=1), [{"id": 3}])
    write(d, key(1, epoch=2), [{"id": 1}, {"id": 2}])
    assert table(d, look) == [("run_1", 1, 1), ("run_1", 1, 2), ("run_1", 2, 3)]


def test_an_uncommitted_slice_leaves_nothing(
    target: tuple[PostgresDestination, psycopg.Connection[Any]],
) -> None:
    """Discard (SIGKILL before the checkpoint) rolls the slice back whole."""
    d, look = target
    write(d, key(1), [{"id": 1}])
    staged = d.stage(key(2), RecordingLog())
    staged.write([{"id": 2}, {"id": 3}])
    staged.seal()
    assert table(d, look) == [("run_1", 1, 1)]  # invisible until publish
    staged.discard()
    assert table(d, look) == [("run_1", 1, 1)]


def test_a_stale_epoch_cannot_write(
    target: tuple[PostgresDestination, psycopg.Connection[Any]],
) -> None:
    """Once epoch 3 wrote a slice, an epoch 2 zombie is refused and changes nothing."""
    d, look = target
    write(d, key(1, epoch=3), [{"id": 1}])
    with pytest.raises(LeaseLost, match="newer lease epoch"):
        write(d, key(1, epoch=2), [{"id": 99}])
    assert table(d, look) == [("run_1", 1, 1)]
    write(d, key(1, epoch=3), [{"id": 1}])  # the holder itself may redo it


def test_writers_of_one_slice_take_turns(
    pg_url: str, target: tuple[PostgresDestination, psycopg.Connection[Any]]
) -> None:
    """A new epoch waits for an older writer's open transaction, then replaces its rows."""
    d, look = target
    other = build_destination(
        "sql", {"url": pg_url, "schema": d.config.db_schema, "table": "raw_{resource}"}, None
    )  # type: ignore[arg-type]
    old = d.stage(key(1, epoch=1), RecordingLog())
    old.write([{"id": 1}, {"id": 2}])
    old.seal()
    done = threading.Event()

    def newer() -> None:
        write(other, key(1, epoch=2), [{"id": 1}])  # type: ignore[arg-type]
        done.set()

    thread = threading.Thread(target=newer)
    thread.start()
    # The newer writer waits on the older transaction's claim: seen as a lock wait in the
    # server's own activity view, not inferred from a pause.
    wait_for(
        lambda: (
            look.execute(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE wait_event_type = 'Lock' AND datname = current_database()"
            ).fetchone()[0]  # type: ignore[index]
            >= 1
        ),
        "the newer writer to wait on the older claim",
    )
    assert not done.is_set()
    old.publish()
    thread.join(10)
    assert done.is_set()
    assert table(d, look) == [("run_1", 1, 1)]
    other.close()  # type: ignore[attr-defined]


def test_drift_new_column_widening_and_coercion(
    target: tuple[PostgresDestination, psycopg.Connection[Any]],
) -> None:
    """New columns are added, a float widens an integer column, text that parses is coerced."""
    d, look = target
    log = RecordingLog()
    write(d, key(1), [{"id": 1, "score": 3}], log)
    write(d, key(2), [{"id": 2, "score": 4.5, "country": "NL"}, {"id": "3", "score": 1}], log)
    rows = look.execute(
        f'SELECT id, score, country FROM "{d.config.db_schema}".raw_orders ORDER BY id'
    ).fetchall()
    assert rows == [(1, 3.0, None), (2, 4.5, "NL"), (3, 1.0, None)]
    changes = log.events("schema_changed")
    assert [c.get("added_columns") for c in changes] == [["country"], None]
    assert changes[1]["widened_columns"] == {"score": "bigint -> double precision"}


def test_a_value_postgres_refuses_fails_the_slice_naming_row_and_column(
    target: tuple[PostgresDestination, psycopg.Connection[Any]],
) -> None:
    """Nothing of the slice is committed; the error says which row and column."""
    d, look = target
    write(d, key(1), [{"id": 1, "day": date(2026, 1, 1)}])
    staged = d.stage(key(2), RecordingLog())
    staged.write([{"id": 2}, {"id": 3}])
    with pytest.raises(
        DestinationError, match=r"^row 4, column 'day': invalid input syntax for type date"
    ):
        staged.write([{"id": 4, "day": date(2026, 1, 2)}, {"id": 5, "day": "not a date"}])
    with pytest.raises(DestinationError, match=r"^row 3, column 'id': value cannot be serialised"):
        staged.write([{"id": object()}])
    staged.discard()
    assert table(d, look) == [("run_1", 1, 1)]


def test_reserved_names_and_config_errors(
    pg_url: str, target: tuple[PostgresDestination, psycopg.Connection[Any]]
) -> None:
    """Bookkeeping columns cannot be overwritten; only PostgreSQL URLs; options named."""
    d, _ = target
    with pytest.raises(DestinationError, match="reserved"):
        write(d, key(1), [{"id": 1, "_quarry_slice": 7}])
    with pytest.raises(
        ConfigError, match=r"destination\.url: the sql destination writes to PostgreSQL"
    ):
        build_destination("sql", {"url": "mysql+pymysql://root@127.0.0.1/test"}, None)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"destination\.tabel"):
        build_destination("sql", {"url": pg_url, "tabel": "x"}, None)  # type: ignore[arg-type]
    assert "password" not in str(d.describe())


def test_sql_pages_stream_in_one_copy_and_errors_still_name_row_and_column(
    target: tuple[PostgresDestination, psycopg.Connection[Any]],
) -> None:
    """Tuple pages (a SQL source) share one COPY per slice; a refused value names its row
    counted across pages, and the slice leaves nothing."""
    d, look = target
    staged = d.stage(key(1), RecordingLog())
    staged.write(RowPage(["id", "day"], [(1, date(2026, 1, 1)), (2, None)]))
    staged.write(RowPage(["id", "day"], [(3, date(2026, 1, 3))]))
    staged.seal()
    staged.publish()
    assert table(d, look) == [("run_1", 1, 1), ("run_1", 1, 2), ("run_1", 1, 3)]
    staged = d.stage(key(2), RecordingLog())
    with pytest.raises(
        DestinationError, match=r"^row 3, column 'day': invalid input syntax for type date"
    ):
        staged.write(RowPage(["id", "day"], [(4, date(2026, 1, 4)), (5, None)]))
        staged.write(RowPage(["id", "day"], [(6, "not a date")]))
        staged.seal()
    staged.discard()
    staged = d.stage(key(2), RecordingLog())  # the connection is usable again
    staged.write(RowPage(["id", "day"], [(4, None)]))
    staged.write([{"id": 5, "day": None, "extra": {"json": True}}])  # a dict page after tuples
    staged.seal()
    staged.publish()
    assert [r[2] for r in table(d, look)] == [1, 2, 3, 4, 5]
