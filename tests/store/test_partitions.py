"""Entries and samples partitioned by day on PostgreSQL: the migration, retention, new days."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import UTC, date, datetime, time, timedelta

import pytest
from alembic import command
from sqlalchemy import create_engine, text

from tests.conftest import empty_pg
from worker.models import Level, NewEntry
from worker.store import Store, migrate, partitions


@pytest.fixture
def fresh_pg() -> Iterator[str]:
    """An empty PostgreSQL database of this test's own (its partitions are the test's)."""
    with empty_pg("quarry_parts") as url:
        yield url


def at(day: date, hour: int = 12) -> datetime:
    """Noon (or ``hour``) UTC on ``day``."""
    return datetime.combine(day, time(hour), tzinfo=UTC)


def where(store: Store, table: str = "log_entries") -> dict[str, int]:
    """Rows per partition of ``table``."""
    with store.engine.connect() as conn:
        rows = conn.execute(
            text(f"SELECT tableoid::regclass::text, count(*) FROM {table} GROUP BY 1")
        ).all()
    return {name: count for name, count in rows}


def snapshot(store: Store, run_id: str) -> list[tuple[object, ...]]:
    """Every entry of a run, every field."""
    return [
        (e.id, e.level, e.event, e.message, e.data, e.worker_id, e.attempt, e.occurred_at)
        for e in store.entries(run_id)
    ]


TODAY = datetime.now(UTC).date()
DAYS = [TODAY - timedelta(days=n) for n in (35, 31, 2, 0)]


RUN = "run_0000000000partition"


def rows(store: Store, table: str = "log_entries") -> list[tuple[object, ...]]:
    """Every row of ``table``, every column, in id order (raw SQL: any revision)."""
    with store.engine.connect() as conn:
        return [tuple(r) for r in conn.execute(text(f"SELECT * FROM {table} ORDER BY id"))]


def add_entry(store: Store, message: str) -> int:
    """One entry through raw SQL (any revision); its id."""
    with store.engine.begin() as conn:
        return int(
            conn.execute(
                text(
                    "INSERT INTO log_entries (run_id, level, event, message, data, worker_id,"
                    " attempt, occurred_at) VALUES (:r, 'info', 'e', :m, '{}', 'w', 1, now())"
                    " RETURNING id"
                ),
                {"r": RUN, "m": message},
            ).scalar_one()
        )


def filled_at_0010(url: str) -> Store:
    """A store at the migration before partitions, with entries on ``DAYS`` and in 2020 and
    samples, written in raw SQL (the store's own code follows the newest schema)."""
    store = Store(url)
    migrate.upgrade(store.engine, "0010")
    now = datetime.now(UTC)
    entries = [
        {"m": f"{day} #{i}", "at": at(day, i), "d": f'{{"i": {i}}}'}
        for day in DAYS
        for i in range(10)
    ]
    entries.append({"m": "2020", "at": at(date(2020, 1, 1)), "d": "{}"})
    with store.engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO runs (id, pipeline, status, attempt, params, lease_epoch, checkpoint,"
                " telemetry_summary, cancel_requested, created_at, queued_at, updated_at)"
                " VALUES (:r, 'demo', 'queued', 1, '{}', 0, '{}', '{}', false, :n, :n, :n)"
            ),
            {"r": RUN, "n": now},
        )
        conn.execute(
            text(
                "INSERT INTO log_entries (run_id, level, event, message, data, worker_id, attempt,"
                " occurred_at) VALUES (:r, 'info', 'e', :m, CAST(:d AS jsonb), 'w', 1, :at)"
            ),
            [{"r": RUN, **e} for e in entries],
        )
        conn.execute(
            text(
                'INSERT INTO telemetry_samples (run_id, at, "values")'
                " VALUES (:r, :at, CAST(:v AS jsonb))"
            ),
            [{"r": RUN, "at": at(day), "v": f'{{"day": "{day}"}}'} for day in DAYS],
        )
    return store


def test_migration_keeps_every_entry_id_and_sample_and_downgrades(fresh_pg: str) -> None:
    """0010 → 0011 → 0010 → 0011: every entry and sample, same ids; the sequence goes on."""
    store = filled_at_0010(fresh_pg)
    before, samples = rows(store), rows(store, "telemetry_samples")
    migrate.upgrade(store.engine, "0011")
    assert rows(store) == before
    assert rows(store, "telemetry_samples") == samples
    # Each row sits in its day; the 2020 entry (over MAX_BACKFILL_DAYS back) in the default.
    placed = where(store)
    assert placed == {
        **{partitions.day_name("log_entries", day): 10 for day in DAYS},
        "log_entries_default": 1,
    }
    assert sum(where(store, "telemetry_samples").values()) == len(DAYS)
    with store.engine.connect() as conn:
        held = partitions.day_partitions(conn, "log_entries")
    for n in range(-1, partitions.DAYS_AHEAD + 1):  # yesterday to the days ahead
        assert TODAY + timedelta(days=n) in held
    added = add_entry(store, "new")
    assert added == before[-1][0] + 1  # type: ignore[operator]

    config = migrate.alembic_config(fresh_pg)
    with store.engine.begin() as conn:
        config.attributes["connection"] = conn
        command.downgrade(config, "0010")
    after_down = rows(store)
    assert after_down[:-1] == before
    assert after_down[-1][0] == added
    assert add_entry(store, "newer") == added + 1
    store.upgrade()
    assert migrate.current_revision(store.engine) == migrate.head_revision()
    assert len(rows(store)) == len(before) + 2
    store.close()


def test_retention_drops_whole_days_and_deletes_only_the_default(fresh_pg: str) -> None:
    """Days past the cutoff go whole; the day holding the cutoff and newer ones stay."""
    store = filled_at_0010(fresh_pg)
    run_id = RUN
    store.upgrade()
    cutoff = at(TODAY - timedelta(days=30), 6)
    removed = store.delete_older_than(cutoff, batch=1)
    assert removed == {"entries": 1, "samples": 0, "entry_days": 2, "sample_days": 2}
    assert sorted({e.message.split(" ")[0] for e in store.entries(run_id)}) == sorted(
        str(day) for day in DAYS[2:]
    )
    assert [v["day"] for _, v in store.samples(run_id)] == [str(day) for day in DAYS[2:]]
    with store.engine.connect() as conn:
        held = partitions.day_partitions(conn, "log_entries")
    assert DAYS[0] not in held and DAYS[1] not in held and DAYS[2] in held
    # Nothing more to do the second time.
    again = store.delete_older_than(cutoff)
    assert again == {"entries": 0, "samples": 0, "entry_days": 0, "sample_days": 0}
    store.close()


def test_a_busy_day_is_kept_for_the_next_retention(
    fresh_pg: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A reader holding the table: retention gives up on the day after its lock timeout."""
    store = filled_at_0010(fresh_pg)
    store.upgrade()
    reader = create_engine(fresh_pg)
    cutoff = at(TODAY - timedelta(days=30), 6)
    with reader.connect() as conn, conn.begin():
        conn.execute(text("SELECT count(*) FROM log_entries")).scalar()
        with caplog.at_level(logging.WARNING, logger="worker.store.maintenance"):
            removed = store.delete_older_than(cutoff)
    assert removed["entry_days"] == 0
    assert "is busy; it is dropped next time" in caplog.text
    assert store.delete_older_than(cutoff)["entry_days"] == 2
    reader.dispose()
    store.close()


def test_a_day_created_late_takes_its_rows_from_the_default(fresh_pg: str) -> None:
    """Entries for a day that has no partition wait in the default, then move, ids kept."""
    store = Store(fresh_pg)
    store.upgrade()
    run = store.create_run("demo")
    later = TODAY + timedelta(days=partitions.DAYS_AHEAD + 7)
    store.append_entries(
        [NewEntry(run.id, Level.INFO, "e", f"m{i}", at(later, i), {}) for i in range(5)]
    )
    store.append_sample(run.id, {"x": 1}, at=at(later))
    before = snapshot(store, run.id)
    assert where(store) == {"log_entries_default": 5}
    created = store.ensure_partitions(today=later)
    assert partitions.day_name("log_entries", later) in created
    assert partitions.day_name("telemetry_samples", later) in created
    assert where(store) == {partitions.day_name("log_entries", later): 5}
    assert where(store, "telemetry_samples") == {partitions.day_name("telemetry_samples", later): 1}
    assert snapshot(store, run.id) == before
    assert store.ensure_partitions(today=later) == []
    store.close()


def test_sqlite_has_no_partitions(sqlite_url: str) -> None:
    """The embedded store keeps plain tables: nothing to create, retention deletes rows."""
    store = Store(sqlite_url)
    assert store.ensure_partitions() == []
    run = store.create_run("demo")
    store.append_entries([NewEntry(run.id, Level.INFO, "old", "m", at(date(2020, 1, 1)), {})])
    removed = store.delete_older_than(at(date(2021, 1, 1)))
    assert removed == {"entries": 1, "samples": 0, "entry_days": 0, "sample_days": 0}
    store.close()
