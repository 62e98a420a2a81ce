"""The driver-level entry reads give exactly what the SQLAlchemy Core query gave, on both stores."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import anyio.to_thread
import orjson
import pytest
from sqlalchemy import select

from worker import jsonfmt
from worker.errors import RunNotFound
from worker.models import Entry, Level, NewEntry
from worker.store import Store
from worker.store.engine import aware
from worker.store.reads import entries_json
from worker.store.tables import log_entries, runs

BASE = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)


def reference(store: Store, **filters: Any) -> list[Entry]:
    """The query ``Store.entries`` ran through SQLAlchemy Core before the driver-level reads."""
    query = select(log_entries).where(log_entries.c.id > filters.get("after_id", 0))
    query = query.order_by(log_entries.c.id).limit(filters.get("limit", 1000))
    if filters.get("run_id") is not None:
        query = query.where(log_entries.c.run_id == filters["run_id"])
    level = filters.get("min_level")
    if level is not None and level is not Level.DEBUG:
        wanted = [lv.value for lv in Level if lv.rank >= level.rank]
        query = query.where(log_entries.c.level.in_(wanted))
    for name in ("event", "worker_id"):
        if filters.get(name) is not None:
            query = query.where(log_entries.c[name] == filters[name])
    if filters.get("since") is not None:
        query = query.where(log_entries.c.occurred_at >= filters["since"])
    if filters.get("until") is not None:
        query = query.where(log_entries.c.occurred_at <= filters["until"])
    if filters.get("pipeline") is not None:
        query = query.where(
            log_entries.c.run_id.in_(
                select(runs.c.id).where(runs.c.pipeline == filters["pipeline"])
            )
        )
    with store.engine.connect() as conn:
        return [
            Entry(
                id=row.id,
                run_id=row.run_id,
                level=Level(row.level),
                event=row.event,
                message=row.message,
                data=row.data or {},
                worker_id=row.worker_id,
                attempt=row.attempt,
                occurred_at=aware(row.occurred_at) or datetime.now(UTC),
            )
            for row in conn.execute(query)
        ]


@pytest.fixture
def filled(store: Store) -> tuple[Store, str, str]:
    """Two pipelines' runs with entries of every level, odd text and data, whole-second times."""
    big = store.create_run("alpha").id
    other = store.create_run("beta", gateway="edge").id
    levels = [Level.DEBUG, Level.INFO, Level.WARNING, Level.ERROR]
    entries = []
    for i in range(120):
        micro = 0 if i % 3 == 0 else i * 1013
        entries.append(
            NewEntry(
                run_id=big if i % 4 else other,
                level=levels[i % 4],
                event=f"ev{i % 5}",
                message=f'm{i} ü \u2028 \n\r\t "q" \\ \x1b[0m' + ("\x00nul" if i == 7 else ""),
                occurred_at=BASE + timedelta(seconds=i, microseconds=micro),
                data={} if i % 6 == 0 else {"i": i, "f": i / 7, "n": None, "l": [1, "ü", {}]},
                worker_id=None if i % 5 == 0 else f"w{i % 3}",
                attempt=None if i % 7 == 0 else i % 3,
            )
        )
    store.append_entries(entries)
    return store, big, other


CASES: list[dict[str, Any]] = [
    {},
    {"limit": 7},
    {"limit": 1},
    {"after_id": 50},
    {"run_id": "RUN"},
    {"run_id": "RUN", "after_id": 60, "limit": 5},
    {"run_id": "RUN", "min_level": Level.WARNING},
    {"run_id": "RUN", "min_level": Level.ERROR},
    {"run_id": "RUN", "min_level": Level.DEBUG},
    {"min_level": Level.INFO, "event": "ev2"},
    {"worker_id": "w1"},
    {"pipeline": "beta"},
    {"pipeline": "nothing"},
    {"since": BASE + timedelta(seconds=30), "until": BASE + timedelta(seconds=60)},
    {"since": BASE + timedelta(seconds=33, microseconds=33 * 1013)},
    {"run_id": "missing"},
]


@pytest.mark.parametrize("case", CASES)
def test_entries_and_dicts_match_the_core_query(
    filled: tuple[Store, str, str], case: dict[str, Any]
) -> None:
    """Same entries, same order, same values; the dicts encode to as_dict's exact bytes."""
    store, big, _ = filled
    filters = {k: (big if v == "RUN" else v) for k, v in case.items()}
    want = reference(store, **filters)
    got = store.entries(**filters)
    assert got == want
    assert [e.occurred_at.utcoffset() for e in got] == [timedelta(0)] * len(got)
    encoded = entries_json({"entries": store.entry_dicts(**filters)})
    assert encoded.decode() == jsonfmt.dumps({"entries": [e.as_dict() for e in want]})


@pytest.mark.parametrize("case", CASES)
def test_json_pages_are_the_core_query_as_dict_bytes(
    filled: tuple[Store, str, str], case: dict[str, Any]
) -> None:
    """The API's page bytes (SQLite writes them itself) are as_dict's, and the cursor follows."""
    store, big, _ = filled
    filters = {k: (big if v == "RUN" else v) for k, v in case.items()}
    limit = filters.pop("limit", 1000)
    want = reference(store, **filters, limit=limit + 1)
    page = store.entry_page_json(**filters, limit=limit)
    assert page.entries.decode() == jsonfmt.dumps([e.as_dict() for e in want[:limit]])
    assert page.cursor == (want[limit - 1].id if len(want) > limit else None)


BACKWARD_CASES: list[dict[str, Any]] = [
    {"before_id": 10**17, "limit": 10},
    {"before_id": 10**17, "limit": 1000},
    {"before_id": 50, "limit": 7},
    {"before_id": 3, "limit": 7},
    {"before_id": 10**17, "run_id": "RUN", "limit": 9},
    {"before_id": 90, "run_id": "RUN", "min_level": Level.WARNING, "limit": 4},
    {"before_id": 10**17, "run_id": "RUN", "event": "ev3", "limit": 2},
]


@pytest.mark.parametrize("case", BACKWARD_CASES)
def test_backward_pages_are_the_newest_entries_below_the_mark_oldest_first(
    filled: tuple[Store, str, str], case: dict[str, Any]
) -> None:
    """Reading a run's tail and then older pages: every entry once, in id order, no gap."""
    store, big, _ = filled
    filters = {k: (big if v == "RUN" else v) for k, v in case.items()}
    before, limit = filters.pop("before_id"), filters.pop("limit")
    below = [e for e in reference(store, **filters, limit=10_000) if e.id < before]
    want = below[-limit:]
    page = store.entry_page_json(**filters, before_id=before, limit=limit)
    assert page.entries.decode() == jsonfmt.dumps([e.as_dict() for e in want])
    assert page.cursor == (want[0].id if len(below) > limit else None)
    # Paging back from the tail to the start reads every entry exactly once.
    seen: list[int] = []
    mark: int | None = before
    while mark is not None:
        back = store.entry_page_json(**filters, before_id=mark, limit=limit)
        seen[:0] = [e["id"] for e in orjson.loads(back.entries)]
        mark = back.cursor
    assert seen == [e.id for e in below]


def test_run_page_checks_the_run_and_its_gateway(filled: tuple[Store, str, str]) -> None:
    """One run's page: the same bytes and cursor; a missing run or another gateway's raises."""
    store, big, other = filled
    page = store.run_entry_page_json(big, after_id=10, limit=20, min_level=Level.INFO)
    assert page == store.entry_page_json(big, after_id=10, limit=20, min_level=Level.INFO)
    assert len(orjson.loads(page.entries)) == 20
    assert page.cursor is not None
    last = store.run_entry_page_json(big, after_id=page.cursor, limit=1000)
    assert last.cursor is None
    assert orjson.loads(last.entries)[0]["id"] > page.cursor
    assert orjson.loads(store.run_entry_page_json(other, gateway="edge").entries)
    with pytest.raises(RunNotFound):
        store.run_entry_page_json(big, gateway="edge")
    with pytest.raises(RunNotFound):
        store.run_entry_page_json("run_missing")


def test_nul_is_read_back_escaped(filled: tuple[Store, str, str]) -> None:
    """NUL stored escaped on PostgreSQL, verbatim on SQLite: reads match the Core query."""
    store, big, _ = filled
    (got,) = [e for e in store.entries(big) if e.message.startswith("m7 ")]
    (want,) = [e for e in reference(store, run_id=big) if e.message.startswith("m7 ")]
    assert got == want


def test_a_session_outside_utc_keeps_its_offsets(
    filled: tuple[Store, str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL in another session time zone: the dicts still encode as as_dict would."""
    store, big, _ = filled
    if store.dialect != "postgresql":
        pytest.skip("SQLite stores naive UTC text")
    monkeypatch.setenv("PGTZ", "Asia/Kolkata")
    kolkata = Store(store.url)
    try:
        want = reference(kolkata, run_id=big)
        assert want[0].occurred_at.isoformat().endswith("+05:30")
        assert kolkata.entries(big) == want
        encoded = entries_json(kolkata.entry_dicts(big)).decode()
        assert encoded == jsonfmt.dumps([e.as_dict() for e in want])
    finally:
        kolkata.close()


def test_sqlite_token_check_finds_a_connection_with_every_thread_busy(store: Store) -> None:
    """The API checks tokens on its event loop on SQLite: with every thread of anyio's pool
    holding a reader connection, the check still gets one (it would wait 30 s for one)."""
    if store.dialect != "sqlite":
        pytest.skip("PostgreSQL checks tokens off the event loop")
    _, secret = store.create_token("read")

    async def pool_threads() -> int:
        return int(anyio.to_thread.current_default_thread_limiter().total_tokens)

    threads = anyio.run(pool_threads)
    held = [store._reader.connect() for _ in range(threads)]
    try:
        token = store.verify_token(secret)
    finally:
        for conn in held:
            conn.close()
    assert token is not None and token.scope == "read"
