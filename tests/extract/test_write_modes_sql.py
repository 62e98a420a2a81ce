"""The sql destination's write modes on a real PostgreSQL: append, replace and merge."""

from __future__ import annotations

import threading
from decimal import Decimal
from typing import Any

import psycopg
import pytest

from tests.extract.conftest import RecordingLog
from worker.destinations import RunScope, SliceKey, WriteSpec, build_destination
from worker.destinations.postgres import PostgresDestination, stage_name
from worker.errors import DestinationError, LeaseLost
from worker.pipelines import WriteMode
from worker.sources.base import Page, RowPage

APPEND_REMOVE = WriteSpec(WriteMode.APPEND, on_failure="remove")
APPEND_KEEP = WriteSpec(WriteMode.APPEND)
REPLACE = WriteSpec(WriteMode.REPLACE)
MERGE = WriteSpec(WriteMode.MERGE, ("id",), hard_delete="deleted")

Target = tuple[PostgresDestination, psycopg.Connection[Any]]


def quiet() -> Any:
    """A recording logger, typed as the run's logger it stands in for."""
    return RecordingLog()


def key(spec: WriteSpec, index: int = 1, epoch: int = 1, run: str = "run_1") -> SliceKey:
    return SliceKey("pipe", run, "orders", index, epoch, write=spec)


def scope(spec: WriteSpec, run: str, epoch: int = 1) -> RunScope:
    return RunScope("pipe", run, epoch, {"orders": spec})


def write(d: PostgresDestination, k: SliceKey, *pages: Page, log: Any = None) -> None:
    """One slice, written and published as the runner does."""
    staged = d.stage(k, quiet() if log is None else log)
    try:
        for page in pages:
            staged.write(page)
        staged.seal()
        staged.publish()
    except BaseException:
        staged.discard()
        raise


def finish(d: PostgresDestination, s: RunScope) -> None:
    publish = d.prepare_finish(s, quiet())
    if publish is not None:
        publish()


def rows(
    d: PostgresDestination, look: psycopg.Connection[Any], columns: str = "id, v"
) -> list[tuple[Any, ...]]:
    return look.execute(
        f'SELECT {columns} FROM "{d.config.db_schema}".raw_orders ORDER BY 1, 2'
    ).fetchall()


def leftovers(d: PostgresDestination, look: psycopg.Connection[Any]) -> list[Any]:
    """Staging tables and slice claims of replace runs still in the schema."""
    schema = d.config.db_schema
    tables = look.execute(
        "SELECT relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE nspname = %s AND relname LIKE '\\_quarry\\_stage\\_%%' AND relkind = 'r'",
        (schema,),
    ).fetchall()
    claims = look.execute(
        f"SELECT dest_table FROM \"{schema}\"._quarry_slices WHERE dest_table LIKE '\\_quarry\\_stage%%'"
    ).fetchall()
    return tables + claims


def page(*pairs: tuple[int, str]) -> list[dict[str, Any]]:
    return [{"id": i, "v": v} for i, v in pairs]


# -- append ---------------------------------------------------------------------------


def test_append_abort_removes_the_run_with_remove_and_keeps_it_with_keep(
    target: Target,
) -> None:
    """``remove`` deletes the failed run's rows and claims (twice is fine); ``keep`` does not."""
    d, look = target
    write(d, key(APPEND_REMOVE, 1, run="run_1"), page((1, "a"), (2, "b")))
    write(d, key(APPEND_REMOVE, 1, run="run_2"), page((3, "c")))
    write(d, key(APPEND_REMOVE, 2, run="run_2"), page((4, "d")))
    d.abort(scope(APPEND_REMOVE, "run_2"), quiet())
    d.abort(scope(APPEND_REMOVE, "run_2"), quiet())
    assert rows(d, look) == [(1, "a"), (2, "b")]
    claims = look.execute(
        f'SELECT run_id FROM "{d.config.db_schema}"._quarry_slices ORDER BY 1'
    ).fetchall()
    assert claims == [("run_1",)]
    write(d, key(APPEND_KEEP, 1, run="run_3"), page((5, "e")))
    d.abort(scope(APPEND_KEEP, "run_3"), quiet())
    assert rows(d, look) == [(1, "a"), (2, "b"), (5, "e")]
    other = RunScope("pipe", "run_4", 1, {"never_written": APPEND_REMOVE})
    d.abort(other, quiet())  # no table at all: nothing to do


# -- replace --------------------------------------------------------------------------


def test_replace_makes_the_table_exactly_the_last_runs_rows(target: Target) -> None:
    """Run 2 changes, adds and drops rows, adds a column and widens one: after its finish
    the table holds run 2's rows only; before it, run 1's; no staging table is left."""
    d, look = target
    write(d, key(REPLACE, 1, run="run_1"), [{"id": i, "v": f"a{i}", "n": i} for i in (1, 2)])
    write(d, key(REPLACE, 2, run="run_1"), [{"id": i, "v": f"a{i}", "n": i} for i in (3, 4)])
    assert not look.execute(
        "SELECT to_regclass(%s)", (f"{d.config.db_schema}.raw_orders",)
    ).fetchone()[0]  # type: ignore[index]
    finish(d, scope(REPLACE, "run_1"))
    assert rows(d, look, "id, v, n, _quarry_run_id") == [
        (i, f"a{i}", i, "run_1") for i in (1, 2, 3, 4)
    ]
    indexes = look.execute(
        "SELECT indexname FROM pg_indexes WHERE schemaname = %s AND tablename = 'raw_orders'",
        (d.config.db_schema,),
    ).fetchall()
    assert indexes == [("raw_orders_quarry_slice_idx",)]  # renamed with its table

    log: Any = RecordingLog()
    write(d, key(REPLACE, 1, run="run_2"), [{"id": 2, "v": "b2", "n": 2.5}], log=log)
    write(d, key(REPLACE, 2, run="run_2"), [{"id": 3, "v": "b3", "n": 3, "extra": True}], log=log)
    write(d, key(REPLACE, 3, run="run_2"), [{"id": 5, "v": "b5", "n": 5}], log=log)
    assert rows(d, look, "id, v, n") == [(i, f"a{i}", i) for i in (1, 2, 3, 4)]  # not yet
    finish(d, scope(REPLACE, "run_2"))
    assert rows(d, look, "id, v, n, extra, _quarry_run_id") == [
        (2, "b2", 2.5, None, "run_2"),
        (3, "b3", 3.0, True, "run_2"),
        (5, "b5", 5.0, None, "run_2"),
    ]
    changes = log.events("schema_changed")
    assert changes[0]["widened_columns"] == {"n": "bigint -> double precision"}
    assert changes[1]["added_columns"] == ["extra"]
    assert changes[0]["table"] == "raw_orders"
    assert leftovers(d, look) == []


def test_a_failed_replace_run_leaves_the_table_untouched(target: Target) -> None:
    """Abort drops the run's staging table and claims; the target keeps run 1's rows."""
    d, look = target
    write(d, key(REPLACE, 1, run="run_1"), page((1, "a"), (2, "b")))
    finish(d, scope(REPLACE, "run_1"))
    write(d, key(REPLACE, 1, run="run_2"), page((7, "x")))
    assert len(leftovers(d, look)) == 2  # its staging table and its claim
    d.abort(scope(REPLACE, "run_2"), quiet())
    d.abort(scope(REPLACE, "run_2"), quiet())
    assert rows(d, look) == [(1, "a"), (2, "b")]
    assert leftovers(d, look) == []


def test_publishing_a_replace_twice_is_a_no_op(target: Target) -> None:
    """Publish twice, and finish again after a publish (a crash before the store's commit):
    nothing changes. A prepared result never published is rolled back."""
    d, look = target
    write(d, key(REPLACE, 1, run="run_1"), page((1, "a")))
    finish(d, scope(REPLACE, "run_1"))
    write(d, key(REPLACE, 1, run="run_2"), page((2, "b"), (3, "c")))
    publish = d.prepare_finish(scope(REPLACE, "run_2"), quiet())
    assert publish is not None
    publish()
    publish()
    assert rows(d, look) == [(2, "b"), (3, "c")]
    assert d.prepare_finish(scope(REPLACE, "run_2", epoch=2), quiet()) is None
    assert rows(d, look) == [(2, "b"), (3, "c")]

    write(d, key(REPLACE, 1, run="run_3"), page((9, "z")))
    unpublished = d.prepare_finish(scope(REPLACE, "run_3"), quiet())
    assert unpublished is not None
    d.close()  # the attempt ended before its final commit
    assert rows(d, look) == [(2, "b"), (3, "c")]
    with pytest.raises(DestinationError, match="rolled back before it was published"):
        unpublished()
    finish(d, scope(REPLACE, "run_3", epoch=2))  # the next attempt finishes it
    assert rows(d, look) == [(9, "z")]


def test_a_replace_run_without_rows_empties_the_table(target: Target) -> None:
    """No slice wrote a row, so there is no staging table: the target ends empty."""
    d, look = target
    write(d, key(REPLACE, 1, run="run_1"), page((1, "a"), (2, "b")))
    finish(d, scope(REPLACE, "run_1"))
    write(d, key(REPLACE, 1, run="run_2"))
    finish(d, scope(REPLACE, "run_2"))
    assert rows(d, look) == []
    assert leftovers(d, look) == []


def test_readers_see_the_old_table_or_the_new_one_never_a_mix(pg_url: str, target: Target) -> None:
    """Threads polling count and distinct run ids while runs of different sizes replace
    the table: every answer is one whole run's, and no query fails."""
    d, look = target
    sizes = {f"run_{n}": 900 + 37 * n for n in range(1, 9)}
    seen: set[tuple[int, int]] = set()
    errors: list[str] = []
    stop = threading.Event()

    def poll() -> None:
        with psycopg.connect(
            pg_url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True
        ) as reader:
            query = (
                "SELECT count(*), count(DISTINCT _quarry_run_id)"
                f' FROM "{d.config.db_schema}".raw_orders'
            )
            while not stop.is_set():
                try:
                    seen.add(reader.execute(query).fetchone())  # type: ignore[arg-type]
                except psycopg.Error as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")

    runs = list(sizes.items())
    first, size = runs[0]
    write(d, key(REPLACE, 1, run=first), page(*((i, "x") for i in range(size))))
    finish(d, scope(REPLACE, first))
    readers = [threading.Thread(target=poll) for _ in range(3)]
    for reader in readers:
        reader.start()
    try:
        for run, size in runs[1:]:
            half = size // 2
            write(d, key(REPLACE, 1, run=run), page(*((i, run) for i in range(half))))
            write(d, key(REPLACE, 2, run=run), page(*((i, run) for i in range(half, size))))
            finish(d, scope(REPLACE, run))
    finally:
        stop.set()
        for reader in readers:
            reader.join(10)
    assert errors == []
    assert seen <= {(size, 1) for size in sizes.values()}
    assert len(seen) >= 3  # the readers did watch the swaps
    assert rows(d, look, "count(*), min(_quarry_run_id)")[0] == (sizes["run_8"], "run_8")


def test_a_resumed_replace_run_has_each_row_once(target: Target) -> None:
    """Epoch 2 of the same run redoes slice 2 into the same staging table; the older epoch
    can no longer finish the run."""
    d, look = target
    write(d, key(REPLACE, 1, run="run_1"), page((1, "a")))
    finish(d, scope(REPLACE, "run_1"))
    write(d, key(REPLACE, 1, epoch=1, run="run_2"), page((1, "b"), (2, "b")))
    write(d, key(REPLACE, 2, epoch=1, run="run_2"), page((3, "b"), (4, "b")))
    staged = d.stage(key(REPLACE, 3, epoch=1, run="run_2"), quiet())
    staged.write(page((5, "lost")))
    staged.discard()  # SIGKILL mid-slice
    write(d, key(REPLACE, 2, epoch=2, run="run_2"), page((3, "c"), (4, "c")))
    write(d, key(REPLACE, 3, epoch=2, run="run_2"), page((5, "c")))
    with pytest.raises(LeaseLost, match="newer lease epoch"):
        d.prepare_finish(scope(REPLACE, "run_2", epoch=1), quiet())
    assert rows(d, look) == [(1, "a")]
    finish(d, scope(REPLACE, "run_2", epoch=2))
    assert rows(d, look) == [(1, "b"), (2, "b"), (3, "c"), (4, "c"), (5, "c")]
    assert stage_name("raw_orders", "run_2").startswith("_quarry_stage_")
    assert leftovers(d, look) == []


# -- merge ----------------------------------------------------------------------------


def merged(d: PostgresDestination, look: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
    return look.execute(
        f'SELECT id, name, amount, deleted, _quarry_run_id, _quarry_slice FROM "{d.config.db_schema}".raw_orders ORDER BY id'
    ).fetchall()


def order(i: int, name: str, amount: str, deleted: bool = False) -> dict[str, Any]:
    return {"id": i, "name": name, "amount": Decimal(amount), "deleted": deleted}


def test_merge_updates_inserts_and_hard_deletes_across_runs(target: Target) -> None:
    """One row per key with the latest values and bookkeeping; a flagged row deletes its key
    (and is not inserted when the key is new); abort keeps what merged."""
    d, look = target
    write(d, key(MERGE, 1, run="run_1"), [order(i, f"n{i}", f"{i}.50") for i in (1, 2, 3)])
    write(d, key(MERGE, 2, run="run_1"), [order(i, f"n{i}", f"{i}.50") for i in (4, 5)])
    before = dict(
        look.execute(
            f'SELECT id, _quarry_loaded_at FROM "{d.config.db_schema}".raw_orders'
        ).fetchall()
    )
    write(
        d,
        key(MERGE, 1, run="run_2"),
        [order(2, "changed", "20.00"), order(6, "new", "6.00"), order(3, "n3", "3.50", True)],
    )
    write(d, key(MERGE, 2, run="run_2"), [order(7, "never", "7.00", True)])
    assert merged(d, look) == [
        (1, "n1", Decimal("1.50"), False, "run_1", 1),
        (2, "changed", Decimal("20.00"), False, "run_2", 1),
        (4, "n4", Decimal("4.50"), False, "run_1", 2),
        (5, "n5", Decimal("5.50"), False, "run_1", 2),
        (6, "new", Decimal("6.00"), False, "run_2", 1),
    ]
    after = dict(
        look.execute(
            f'SELECT id, _quarry_loaded_at FROM "{d.config.db_schema}".raw_orders'
        ).fetchall()
    )
    assert after[2] > before[2] and after[1] == before[1]
    assert d.prepare_finish(scope(MERGE, "run_2"), quiet()) is None
    d.abort(scope(MERGE, "run_2"), quiet())
    assert len(merged(d, look)) == 5


def test_a_redone_merge_slice_leaves_one_row_per_key(target: Target) -> None:
    """The same slice again under a newer epoch upserts again: no duplicates, its values;
    it deletes nothing by slice (a key only the first attempt saw stays)."""
    d, look = target
    rows_1 = RowPage(["id", "name", "amount", "deleted"], [(1, "a", Decimal(1), False)])
    write(d, key(MERGE, 1, epoch=1), rows_1, [order(2, "b", "2")])
    write(d, key(MERGE, 1, epoch=2), [order(1, "a2", "1")], [order(3, "c2", "3")])
    assert [(r[0], r[1]) for r in merged(d, look)] == [(1, "a2"), (2, "b"), (3, "c2")]
    with pytest.raises(LeaseLost):
        write(d, key(MERGE, 1, epoch=1), [order(1, "zombie", "0")])
    assert [(r[0], r[1]) for r in merged(d, look)] == [(1, "a2"), (2, "b"), (3, "c2")]


def test_within_a_slice_the_last_row_of_a_key_wins(target: Target) -> None:
    """Across pages (tuples, then dicts): the last row decides, a delete included; without
    hard_delete too, for keys already in the table and new ones."""
    d, look = target
    write(d, key(MERGE, 1, run="run_1"), [order(3, "old", "3")])
    columns = ["id", "name", "amount", "deleted"]
    write(
        d,
        key(MERGE, 1, run="run_2"),
        RowPage(columns, [(1, "first", Decimal(1), False), (2, "x", Decimal(2), False)]),
        RowPage(columns, [(1, "second", Decimal(1), False), (3, "gone", Decimal(3), True)]),
        [order(2, "deleted then back", "2", True), order(2, "back", "22")],
        [order(1, "third", "11")],
    )
    assert [(r[0], r[1], r[2]) for r in merged(d, look)] == [
        (1, "third", Decimal(11)),
        (2, "back", Decimal(22)),
    ]
    plain = WriteSpec(WriteMode.MERGE, ("id",))  # no hard_delete: the unsorted upsert first
    write(d, key(plain, 1, run="run_3"), [order(4, "unique", "4")])
    write(
        d,
        key(plain, 1, run="run_4"),
        [order(1, "x", "1"), order(5, "new once", "5"), order(1, "y", "1")],
        [order(5, "new twice", "5")],
    )
    assert [(r[0], r[1]) for r in merged(d, look)] == [
        (1, "y"), (2, "back"), (4, "unique"), (5, "new twice"),
    ]  # fmt: skip


def test_merge_refuses_a_table_with_duplicate_keys(target: Target) -> None:
    """An appended table holding a key twice cannot take a unique index: a clear error,
    nothing written; without duplicates the index is created and merge goes on."""
    d, look = target
    write(d, key(APPEND_KEEP, 1, run="run_1"), page((1, "a"), (1, "again"), (2, "b")))
    with pytest.raises(
        DestinationError,
        match=r"raw_orders: cannot merge on primary_key \(id\): .*Key \(id\)=\(1\) is duplicated",
    ):
        write(d, key(WriteSpec(WriteMode.MERGE, ("id",)), 1, run="run_2"), page((3, "c")))
    assert rows(d, look) == [(1, "a"), (1, "again"), (2, "b")]
    look.execute(f"DELETE FROM \"{d.config.db_schema}\".raw_orders WHERE v = 'again'")
    write(d, key(WriteSpec(WriteMode.MERGE, ("id",)), 1, run="run_2"), page((1, "A"), (3, "c")))
    assert rows(d, look) == [(1, "A"), (2, "b"), (3, "c")]


def test_merge_on_a_composite_key(target: Target) -> None:
    """Rows match on every key column (a mixed-case one too); the key's order in the config
    does not matter."""
    d, look = target
    spec = WriteSpec(WriteMode.MERGE, ("Region", "id"))
    write(
        d,
        key(spec, 1, run="run_1"),
        [{"Region": r, "id": i, "v": f"{r}{i}"} for r in ("eu", "us") for i in (1, 2)],
    )
    write(d, key(spec, 1, run="run_2"), [{"id": 1, "Region": "us", "v": "new"}])
    write(
        d,
        key(WriteSpec(WriteMode.MERGE, ("id", "Region")), 1, run="run_3"),
        [{"id": 3, "Region": "eu", "v": "eu3"}],
    )
    got = look.execute(
        f'SELECT "Region", id, v FROM "{d.config.db_schema}".raw_orders ORDER BY 1, 2'
    ).fetchall()
    assert got == [
        ("eu", 1, "eu1"), ("eu", 2, "eu2"), ("eu", 3, "eu3"), ("us", 1, "new"), ("us", 2, "us2"),
    ]  # fmt: skip


def test_merge_names_a_missing_or_null_key_and_drifts_like_append(target: Target) -> None:
    """A page without the key column or a row with a null key fails the slice, naming it;
    new columns and a widened integer column reach the target as in append."""
    d, look = target
    with pytest.raises(DestinationError, match=r"raw_orders: .*column 'id' of the primary key"):
        write(d, key(MERGE, 1), [{"name": "no key"}])
    with pytest.raises(
        DestinationError, match=r"^row 2, column 'id': a primary key column is null"
    ):
        write(d, key(MERGE, 1), RowPage(["id", "v"], [(1, "a"), (None, "b")]))
    with pytest.raises(
        DestinationError, match=r"^row 3, column 'id': a primary key column is null"
    ):
        write(d, key(MERGE, 1), [{"id": 1, "v": "a"}, {"id": 2}, {"v": "no id"}])
    log: Any = RecordingLog()
    write(d, key(MERGE, 1), [{"id": 1, "v": "a", "score": 3}], log=log)
    write(d, key(MERGE, 2), [{"id": 1, "v": "b", "score": 4.5, "meta": {"k": 1}}], log=log)
    got = look.execute(
        f'SELECT id, v, score, meta FROM "{d.config.db_schema}".raw_orders'
    ).fetchall()
    assert got == [(1, "b", 4.5, {"k": 1})]
    changes = log.events("schema_changed")
    assert [c.get("added_columns") for c in changes] == [["meta"], None]
    assert changes[1]["widened_columns"] == {"score": "bigint -> double precision"}


def test_runs_creating_the_same_new_table_at_once_both_land(target: Target, pg_url: str) -> None:
    """Two runs' first slices into a table that does not exist yet, at the same instant:
    one creates it, the other finds it created (IF NOT EXISTS alone is not atomic)."""
    first, look = target
    second = build_destination(  # type: ignore[arg-type]
        "sql", {"url": pg_url, "schema": first.config.db_schema, "table": "raw_{resource}"}, None
    )
    assert isinstance(second, PostgresDestination)
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def load(d: PostgresDestination, run: str, base: int) -> None:
        staged = d.stage(key(APPEND_KEEP, run=run), quiet())
        try:
            barrier.wait()
            staged.write(RowPage(["id", "v"], [(base + i, f"v{i}") for i in range(100)]))
            staged.seal()
            staged.publish()
        except BaseException as exc:
            errors.append(exc)
            staged.discard()

    threads = [
        threading.Thread(target=load, args=(first, "run_a", 0)),
        threading.Thread(target=load, args=(second, "run_b", 1000)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    second.close()
    assert errors == []
    assert len(rows(first, look)) == 200
