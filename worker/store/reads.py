"""Reading log entries: the keyset page query through the driver, rows built without SQLAlchemy.

Mixed into :class:`~worker.store.store.Store`. A page of a thousand entries is
read on a raw DBAPI cursor from hand-built keyset SQL (the same query the
SQLAlchemy Core version ran; ``tests/store/test_entry_reads.py`` holds them
equal) and built straight from tuples, because SQLAlchemy's per-row result
processing cost more than the query itself.

The API's pages go one step further (:meth:`EntryReads.entry_page_json`): on
SQLite the database writes each entry's JSON itself (JSON1's ``json_object``),
the bytes :func:`entries_json` would have written, so no entry becomes a
Python object at all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, TypedDict, TypeVar, Unpack

import orjson
from sqlalchemy import Connection, Engine, func, select

from worker.errors import RunNotFound
from worker.jsonfmt import loads, safe_bytes
from worker.models import Entry, Level
from worker.store.engine import aware, driver_cursor, fetch_one, utcnow
from worker.store.entries import HORIZON_SQL
from worker.store.tables import LEVEL_FILTERS, log_entries

#: Columns of an entry row, in the order the builders below unpack them.
ENTRY_COLUMNS = (
    "id", "run_id", "level", "event", "message", "data", "worker_id", "attempt", "occurred_at",
)  # fmt: skip
_ENTRY_SELECT = "id, run_id, level, event, message, {data}, worker_id, attempt, {occurred_at}"
_LEVEL_OF = {level.value: level for level in Level}  # Level(text) costs an enum lookup a row
#: Session time zones in which a ``timestamptz`` reads back with a zero offset.
_UTC_ZONES = frozenset(
    {"UTC", "Etc/UTC", "UCT", "Etc/UCT", "Universal", "Etc/Universal", "Zulu", "Etc/Zulu"}
)
#: SQLite's JSON of an entry, byte for byte what ``entries_json`` writes of its dict:
#: JSON1 escapes strings as orjson does, ``json(data)`` minifies the stored JSON (which
#: jsonfmt wrote minified already), and the stored ``YYYY-MM-DD HH:MM:SS.ffffff`` UTC
#: text becomes orjson's ``YYYY-MM-DDTHH:MM:SS[.ffffff]Z`` (no fraction when it is zero).
_SQLITE_ENTRY_JSON = (
    "id, json_object("
    "'id', id, 'run_id', run_id, 'level', level, 'event', event, 'message', message, "
    "'data', CASE WHEN data = 'null' THEN json('{}') ELSE json(data) END, "
    "'worker_id', worker_id, 'attempt', attempt, 'occurred_at', "
    "replace(CASE WHEN substr(occurred_at, 20) = '.000000' THEN substr(occurred_at, 1, 19) "
    "ELSE occurred_at END, ' ', 'T') || 'Z')"
)
_RUN_GATEWAY_SQL = {
    "postgresql": "SELECT gateway FROM runs WHERE id = %s",
    "sqlite": "SELECT gateway FROM runs WHERE id = ?",
}
_PIPELINE_HAS_RUNS_SQL = {
    "postgresql": "SELECT 1 FROM runs WHERE pipeline = %s LIMIT 1",
    "sqlite": "SELECT 1 FROM runs WHERE pipeline = ? LIMIT 1",
}
_T = TypeVar("_T")

#: orjson options that write :meth:`Store.entry_dicts` byte for byte as ``jsonfmt.dumps``
#: writes ``Entry.as_dict()``: jsonfmt's own, and a naive (UTC) datetime with a ``Z``.
ENTRY_JSON_OPTIONS = (
    orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NAIVE_UTC | orjson.OPT_UTC_Z
)


def entries_json(value: Any) -> bytes:
    """JSON of a value holding :meth:`Store.entry_dicts` (a page, one entry), as bytes.

    An entry whose stored data cannot be encoded keeps its place, its data replaced.
    """
    return safe_bytes(value, option=ENTRY_JSON_OPTIONS)


_fromisoformat = datetime.fromisoformat
_orjson_loads = orjson.loads  # what jsonfmt.loads calls, one call fewer a row


def _json_value(value: Any) -> Any:
    """A JSON column as SQLAlchemy's JSON type reads it (SQLite may hold a bare number)."""
    if isinstance(value, str | bytes):
        return loads(value)
    return value


def entry_from_tuple(row: tuple[Any, ...]) -> Entry:
    """An entry from a driver row (``_ENTRY_SELECT`` order), as SQLAlchemy would have typed it."""
    entry_id, run_id, level, event, message, data, worker_id, attempt, occurred_at = row
    if type(occurred_at) is str:  # SQLite: SQLAlchemy's DateTime reads with fromisoformat
        occurred_at = _fromisoformat(occurred_at)
    return Entry(
        id=entry_id,
        run_id=run_id,
        level=_LEVEL_OF.get(level) or Level(level),
        event=event,
        message=message,
        data=_json_value(data) or {},
        worker_id=worker_id,
        attempt=attempt,
        occurred_at=aware(occurred_at) or utcnow(),
    )


def _dict_from_tuple(row: tuple[Any, ...]) -> dict[str, Any]:
    """``entry_from_tuple(row).as_dict()`` without the Entry; a naive occurred_at is UTC."""
    entry_id, run_id, level, event, message, data, worker_id, attempt, occurred_at = row
    if level not in _LEVEL_OF:
        Level(level)  # raises, as Entry's would
    data = _orjson_loads(data) if type(data) is str else _json_value(data)
    if type(occurred_at) is str:
        occurred_at = _fromisoformat(occurred_at)
    elif occurred_at is None:
        occurred_at = utcnow()
    if occurred_at.tzinfo is not None:
        occurred_at = occurred_at.isoformat().replace("+00:00", "Z")
    return {
        "id": entry_id,
        "run_id": run_id,
        "level": level,
        "event": event,
        "message": message,
        "data": data or {},
        "worker_id": worker_id,
        "attempt": attempt,
        "occurred_at": occurred_at,
    }


def _session_in_utc(conn: Connection) -> bool:
    """Whether a PostgreSQL session's TimeZone has no offset (reported by the server)."""
    info = conn.connection.driver_connection.info  # type: ignore[union-attr]
    return info.parameter_status("TimeZone") in _UTC_ZONES


@dataclass(frozen=True, slots=True)
class _EntryQuery:
    """The keyset query behind :meth:`Store.entries`, as driver SQL for either database."""

    run_id: str | None
    after_id: int = 0
    limit: int = 1000
    min_level: Level | None = None
    event: str | None = None
    worker_id: str | None = None
    pipeline: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    #: Read backwards: the newest entries below this id (the query returns them newest
    #: first; :meth:`EntryReads._page_json` turns the page around).
    before_id: int | None = None
    #: PostgreSQL, across runs: only ids below this horizon (see :meth:`EntryReads._horizon`).
    below_id: int | None = None

    def postgresql(self, *, utc: bool) -> tuple[str, tuple[Any, ...]]:
        """SQL and parameters for psycopg; ``utc``: occurred_at as naive UTC wall time."""
        columns = _ENTRY_SELECT.format(
            data="data::text",
            occurred_at="occurred_at AT TIME ZONE 'UTC'" if utc else "occurred_at",
        )
        where: list[str] = ["id > %s"]
        params: list[Any] = [self.after_id]
        if self.run_id is not None:
            # `run_id BETWEEN x AND x`, not `= x`, and ordered like the (run_id, id) index:
            # with an equality PostgreSQL may walk the primary key instead and filter every
            # later run's rows, which makes a large run's last page read the whole table.
            where.append("run_id >= %s AND run_id <= %s")
            params += [self.run_id, self.run_id]
        order = "run_id, id" if self.run_id is not None else "id"
        if self.below_id is not None:
            where.append("id < %s")
            params.append(self.below_id)
        if self.before_id is not None:
            where.append("id < %s")
            params.append(self.before_id)
            order = "run_id DESC, id DESC" if self.run_id is not None else "id DESC"
        self._filters(where, params, "%s", lambda value: value)
        sql = (
            f"SELECT {columns} FROM log_entries WHERE {' AND '.join(where)} "  # noqa: S608
            f"ORDER BY {order} LIMIT %s"
        )
        return sql, (*params, self.limit)

    def sqlite(self, dialect: Any, columns: str | None = None) -> tuple[str, tuple[Any, ...]]:
        """SQL and parameters for sqlite3, times bound as SQLAlchemy's DateTime binds them."""
        columns = columns or _ENTRY_SELECT.format(data="data", occurred_at="occurred_at")
        where: list[str] = ["id > ?"]
        params: list[Any] = [self.after_id]
        if self.run_id is not None:
            # SQLite plans the equality well and would scan the whole run for the range.
            where.append("run_id = ?")
            params.append(self.run_id)
        order = "id"
        if self.before_id is not None:
            where.append("id < ?")
            params.append(self.before_id)
            order = "id DESC"
        bind = log_entries.c.occurred_at.type.dialect_impl(dialect).bind_processor(dialect)
        self._filters(where, params, "?", bind or (lambda value: value))
        sql = (
            f"SELECT {columns} FROM log_entries WHERE {' AND '.join(where)} "  # noqa: S608
            f"ORDER BY {order} LIMIT ?"
        )
        return sql, (*params, self.limit)

    def _filters(
        self, where: list[str], params: list[Any], mark: str, bind_time: Callable[[Any], Any]
    ) -> None:
        if self.min_level is not None and self.min_level.value in LEVEL_FILTERS:
            where.append(LEVEL_FILTERS[self.min_level.value])  # a partial index's predicate
        elif self.min_level is not None and self.min_level is not Level.DEBUG:
            levels = _levels_at_least(self.min_level)
            where.append(f"level IN ({', '.join([mark] * len(levels))})")
            params += levels
        if self.event is not None:
            where.append(f"event = {mark}")
            params.append(self.event)
        if self.worker_id is not None:
            where.append(f"worker_id = {mark}")
            params.append(self.worker_id)
        if self.since is not None:
            where.append(f"occurred_at >= {mark}")
            params.append(bind_time(self.since))
        if self.until is not None:
            where.append(f"occurred_at <= {mark}")
            params.append(bind_time(self.until))
        if self.pipeline is not None:
            where.append(f"run_id IN (SELECT id FROM runs WHERE pipeline = {mark})")  # noqa: S608
            params.append(self.pipeline)


@dataclass(frozen=True, slots=True)
class JsonPage:
    """A page of entries as the bytes of a JSON array, and the next page's cursor."""

    #: ``[{entry}, ...]``, oldest first, each entry as ``Entry.as_dict`` encodes.
    entries: bytes
    #: The last entry's id when more entries follow; None on the last page.
    cursor: int | None


class EntryFilters(TypedDict, total=False):
    """The keyword filters of the entry reads (``Store.entries`` and the pages)."""

    #: The cursor: entries with a larger id.
    after_id: int
    #: Reading backwards: the newest entries with a smaller id (a page's cursor is then
    #: its oldest id, while older entries remain).
    before_id: int | None
    #: Most entries returned (1000 unless given).
    limit: int
    #: This level and above (``warning``: warnings and errors).
    min_level: Level | None
    event: str | None
    worker_id: str | None
    #: Entries of this pipeline's runs.
    pipeline: str | None
    #: ``occurred_at`` bounds, both inclusive.
    since: datetime | None
    until: datetime | None


def _joined(rows: list[tuple[int, str]]) -> bytes:
    """SQLite's per-entry JSON texts as one JSON array: the brackets on the end items, one
    join, one encode, no more copies of the page."""
    texts = [text for _, text in rows]
    texts[0] = "[" + texts[0]
    texts[-1] += "]"
    return ",".join(texts).encode()


def _levels_at_least(level: Level) -> list[str]:
    return [lv.value for lv in Level if lv.rank >= level.rank]


class EntryReads:
    """Entry pages (mixed into ``Store``)."""

    engine: Engine
    _reader: Engine
    dialect: str

    def entries(self, run_id: str | None = None, **filters: Unpack[EntryFilters]) -> list[Entry]:
        """Entries oldest first, after the ``after_id`` cursor, optionally filtered.

        ``since`` and ``until`` bound ``occurred_at`` (both inclusive); ``pipeline``
        filters through the run. The id is the only order and the only cursor.
        """
        with self._reader.connect() as conn:
            query = _EntryQuery(run_id, **filters)
            return self._read_entries(conn, query, entry_from_tuple, utc_text=False)

    def entry_dicts(
        self, run_id: str | None = None, **filters: Unpack[EntryFilters]
    ) -> list[dict[str, Any]]:
        """What :meth:`entries` returns, each as :meth:`Entry.as_dict` would give it.

        Built straight from the driver's rows, for pages of a thousand. One
        difference: ``occurred_at`` may be a naive UTC ``datetime`` rather than its
        text; :func:`entries_json` writes it exactly as ``as_dict`` does.
        """
        with self._reader.connect() as conn:
            query = _EntryQuery(run_id, **filters)
            return self._read_entries(conn, query, _dict_from_tuple, utc_text=True)

    def entry_page_json(
        self, run_id: str | None = None, **filters: Unpack[EntryFilters]
    ) -> JsonPage:
        """A page of :meth:`entry_dicts` (``limit`` at most) as :func:`entries_json` bytes."""
        with self._reader.connect() as conn:
            return self._page_json(conn, _EntryQuery(run_id, **filters))

    def run_entry_page_json(
        self, run_id: str, *, gateway: str | None = None, **filters: Unpack[EntryFilters]
    ) -> JsonPage:
        """One run's :meth:`entry_page_json`, the run looked up on the same connection.

        Raises :class:`RunNotFound` when there is no such run, or when ``gateway``
        is given and the run is not targeted at it (no entry is read then).
        """
        with self._reader.connect() as conn:
            found = fetch_one(conn, _RUN_GATEWAY_SQL[self.dialect], (run_id,))
            if found is None or (gateway is not None and found[0] != gateway):
                raise RunNotFound(run_id)
            return self._page_json(conn, _EntryQuery(run_id, **filters))

    def _page_json(self, conn: Connection, page: _EntryQuery) -> JsonPage:
        """``page`` as a :class:`JsonPage`, one row more read to learn whether more follow."""
        if self._matches_nothing(conn, page):
            return JsonPage(b"[]", None)
        limit = page.limit
        query = replace(page, limit=limit + 1)
        if self.dialect == "sqlite":
            cursor = driver_cursor(conn)
            try:
                cursor.execute(*query.sqlite(self.engine.dialect, _SQLITE_ENTRY_JSON))
                rows = cursor.fetchall()
            finally:
                cursor.close()
            more = len(rows) > limit
            del rows[limit:]
            if not rows:
                return JsonPage(b"[]", None)
            if page.before_id is not None:
                rows.reverse()  # read newest first; a page is always oldest first
                return JsonPage(_joined(rows), rows[0][0] if more else None)
            return JsonPage(_joined(rows), rows[-1][0] if more else None)
        # PostgreSQL: jsonb and timestamptz text are not orjson's, so the page goes through
        # dicts (a ratio to raw SQL that already met the goal; see docs/design.md).
        dicts = self._read_entries(conn, query, _dict_from_tuple, utc_text=True)
        more = len(dicts) > limit
        del dicts[limit:]
        if page.before_id is not None:
            dicts.reverse()
            return JsonPage(entries_json(dicts), dicts[0]["id"] if more and dicts else None)
        return JsonPage(entries_json(dicts), dicts[-1]["id"] if more and dicts else None)

    def _read_entries(
        self,
        conn: Connection,
        query: _EntryQuery,
        build: Callable[[tuple[Any, ...]], _T],
        *,
        utc_text: bool,
    ) -> list[_T]:
        """Run ``query`` through the driver and ``build`` each row."""
        if self._matches_nothing(conn, query):
            return []
        cursor = driver_cursor(conn)
        try:
            if self.dialect == "postgresql":
                if query.run_id is None:
                    query = replace(query, below_id=self._horizon(conn))
                # Naive UTC wall times are cheaper to load than zone-aware ones, and
                # read the same once written out; only when the session is in UTC,
                # so that every other zone keeps the offset it always had.
                utc = utc_text and _session_in_utc(conn)
                sql, params = query.postgresql(utc=utc)
                cursor.execute(sql, params)
                return [build(row) for row in cursor.fetchall()]
            sql, params = query.sqlite(self.engine.dialect)
            cursor.execute(sql, params)
            return [build(row) for row in cursor.fetchall()]
        finally:
            cursor.close()

    def _horizon(self, conn: Connection) -> int:
        """Entries below this id are final (PostgreSQL): every transaction that could still
        add one lower has ended. Read before, and in another statement than, the page: the
        page's snapshot must be younger than the lock table's state it is bounded by."""
        found = fetch_one(conn, HORIZON_SQL, ())
        assert found is not None
        return int(found[0])

    def _matches_nothing(self, conn: Connection, query: _EntryQuery) -> bool:
        """Whether a ``pipeline`` filter names a pipeline with no run (one indexed lookup).

        The keyset query walks entries in id order and tests each against the
        pipeline's runs: for a pipeline with none, that is the whole table.
        """
        if query.pipeline is None:
            return False
        return fetch_one(conn, _PIPELINE_HAS_RUNS_SQL[self.dialect], (query.pipeline,)) is None

    def count_entries(self, run_id: str) -> int:
        """How many entries a run has."""
        with self._reader.connect() as conn:
            return int(
                conn.execute(
                    select(func.count()).where(log_entries.c.run_id == run_id)
                ).scalar_one()
            )
