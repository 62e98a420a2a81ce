"""The SQL destination: a PostgreSQL table per resource, each slice in one transaction.

A slice's transaction first claims the slice in ``_quarry_slices`` under the
writer's lease epoch (a row lock that serialises writers of the same slice;
an older epoch than the one recorded is refused with :class:`LeaseLost`), then
streams the pages in with ``COPY``. It commits inside the run's fenced
checkpoint transaction, so a stale lease cannot write.

What a slice does with its rows, and what a run that ends ``failed`` or
``cancelled`` leaves behind, depends on the resource's ``write_mode``:

- **append**: the slice first deletes the rows an earlier attempt of it left
  (by ``_quarry_run_id`` and ``_quarry_slice``), so a redone slice replaces its
  rows. A failed or cancelled run keeps its committed slices
  (``on_failure = "keep"``) or has them deleted again (``"remove"``: every row
  of the run, by ``_quarry_run_id``).
- **replace**: the slices go to a staging table of the run in the same schema
  (``_quarry_stage_<hash of table and run id>``, created like the target),
  with append's claim and redo, so a resumed run continues into it. Before the
  run's final commit, :meth:`PostgresDestination.prepare_finish` deletes the
  target's rows and inserts the staging table's in one transaction that it
  leaves open; the publish step only commits it (with a row in
  ``_quarry_finished``, which makes a second finish of the run a no-op). Readers
  see the old rows or the new ones, never a mix and never an error, and the
  target keeps its grants, indexes and dependent views; the dead rows left
  behind are autovacuum's. A run without rows empties the target. A failed or
  cancelled run leaves the target as it was; its staging table is dropped.
- **merge**: each slice copies its rows into a temporary table, then, in the
  same transaction, upserts them into the target on ``primary_key`` (a unique
  index the table is given; existing duplicates are an error): the last row
  of a key within a slice wins, an existing row takes every non-key column
  and the bookkeeping columns from it, and with ``hard_delete`` a row whose
  flag is true deletes its key's row instead. A redone slice upserts again
  (no delete). A failed or cancelled run leaves its committed slices' upserts
  in place: a later run of the same data converges to the same table.

Every row carries ``_quarry_run_id``, ``_quarry_slice`` (indexed, except in a
table made by merge) and ``_quarry_loaded_at``. The table is created from the
first page's values if it is absent. Schema drift, in every mode:

- a **new column** is added (``ALTER TABLE … ADD COLUMN``) and logged as
  ``schema_changed``;
- a float arriving in an integer column **widens** it to ``double precision``
  (a ``Decimal``: to ``numeric``), logged;
- any other value is passed to PostgreSQL as is, which **coerces** what it can
  (``"42"`` into a ``bigint`` column) — and where it cannot, the slice
  **fails** with an error naming the row (1-based within the slice) and the
  column; nothing of the slice is committed.
"""

from __future__ import annotations

import contextlib
from typing import Any

import psycopg
from psycopg import sql
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from worker.dbfaults import is_transient
from worker.destinations.base import Publish, RunScope, SliceKey
from worker.destinations.pg_schema import (
    _FINISHED_KEPT,
    _INTEGER_TYPES,
    _WIDER_TYPES,
    _exists,
    _names,
    _slice_index,
    _table_columns,
    stage_name,
)
from worker.destinations.pg_table import StagedTable
from worker.errors import ConfigError, DestinationError, LeaseLost, first_line
from worker.pipelines import WriteMode, parse_options
from worker.runlog import Logger
from worker.scrub import scrubber


class PostgresConfig(BaseModel):
    """The ``[destination]`` table of a SQL destination."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    url: str
    db_schema: str = Field(default="public", alias="schema")
    #: The table name; ``{resource}`` is replaced by the resource's name.
    table: str = "{resource}"


class _Finish:
    """A replace run's result: prepared in an open transaction, published by committing it."""

    def __init__(self, conn: psycopg.Connection[Any], tables: list[str]) -> None:
        self.conn = conn
        self.tables = tables
        self.state = "open"

    def publish(self) -> None:
        """Commit the prepared swap; a second call does nothing."""
        if self.state == "published":
            return
        if self.state != "open":
            msg = f"the result for {', '.join(self.tables)} was rolled back before it was published"
            raise DestinationError(msg, retryable=True)
        try:
            self.conn.commit()
        except psycopg.Error as exc:
            self.state = "failed"
            msg = f"cannot publish {', '.join(self.tables)}: {first_line(exc)}"
            raise DestinationError(scrubber.text(msg), retryable=True) from None
        self.state = "published"

    def discard(self) -> None:
        """Roll back a prepared result that will not be published."""
        if self.state == "open":
            self.state = "discarded"
            with contextlib.suppress(psycopg.Error):
                self.conn.rollback()


class PostgresDestination:
    """Writes each resource to a PostgreSQL table, one transaction per slice."""

    def __init__(self, config: PostgresConfig) -> None:
        try:
            url = make_url(config.url)
        except ArgumentError:
            msg = "destination.url: not a database URL"
            raise ConfigError(msg) from None
        if url.get_backend_name() != "postgresql":
            msg = f"destination.url: the sql destination writes to PostgreSQL, not {url.drivername}"
            raise ConfigError(msg)
        if "{resource}" not in config.table and "{" in config.table:
            msg = "destination.table: the only placeholder is {resource}"
            raise ConfigError(msg)
        self.config = config
        self.url = url
        scrubber.register([url.password if isinstance(url.password, str) else None])
        self._conninfo: dict[str, Any] = {
            "host": url.host,
            "port": url.port,
            "user": url.username,
            "password": url.password,
            "dbname": url.database,
            **{k: v for k, v in url.query.items() if isinstance(v, str)},
        }
        self._conn: psycopg.Connection[Any] | None = None
        self._ready = False
        self._pending: _Finish | None = None

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> PostgresDestination:
        """Build from the pipeline's destination table."""
        return cls(parse_options(PostgresConfig, options, "destination"))

    def connection(self) -> psycopg.Connection[Any]:
        """The destination's connection, (re)opened and set up on demand.

        A replace result prepared but not published is rolled back first: whatever
        uses the connection next must not commit it by accident.
        """
        if self._pending is not None:
            self._pending.discard()
            self._pending = None
        if self._conn is None or self._conn.closed or self._conn.broken:
            try:
                self._conn = psycopg.connect(
                    **{k: v for k, v in self._conninfo.items() if v is not None},
                    application_name="quarry-destination",
                    connect_timeout=10,
                )
            except psycopg.Error as exc:
                msg = f"cannot connect to {self.describe()['url']}: {first_line(exc)}"
                raise DestinationError(scrubber.text(msg), retryable=is_transient(exc)) from None
            self._ready = False
        if not self._ready:
            self._setup(self._conn)
        return self._conn

    def _setup(self, conn: psycopg.Connection[Any]) -> None:
        schema = sql.Identifier(self.config.db_schema)
        try:
            with conn.transaction():
                conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(schema))
                conn.execute(
                    sql.SQL(
                        "CREATE TABLE IF NOT EXISTS {}._quarry_slices ("
                        " dest_table text NOT NULL, run_id text NOT NULL, slice integer NOT NULL,"
                        " epoch bigint NOT NULL, rows bigint,"
                        " written_at timestamptz NOT NULL DEFAULT now(),"
                        " PRIMARY KEY (dest_table, run_id, slice))"
                    ).format(schema)
                )
                conn.execute(
                    sql.SQL(
                        "CREATE TABLE IF NOT EXISTS {}._quarry_finished ("
                        " dest_table text NOT NULL, run_id text NOT NULL, epoch bigint NOT NULL,"
                        " finished_at timestamptz NOT NULL DEFAULT now(),"
                        " PRIMARY KEY (dest_table, run_id))"
                    ).format(schema)
                )
        except psycopg.errors.UniqueViolation:
            pass  # created concurrently by another worker: it exists now
        except psycopg.Error as exc:
            msg = f"cannot prepare schema {self.config.db_schema!r}: {first_line(exc)}"
            raise DestinationError(scrubber.text(msg), retryable=is_transient(exc)) from None
        self._ready = True

    def table_name(self, resource: str) -> str:
        """The table ``resource`` is written to."""
        return self.config.table.replace("{resource}", resource)

    def stage(self, key: SliceKey, log: Logger) -> StagedTable:
        """Open the slice's transaction and claim the slice under the lease epoch."""
        return StagedTable(self, key, log)

    # -- the run's end ----------------------------------------------------------

    def prepare_finish(self, scope: RunScope, log: Logger) -> Publish | None:
        """Build every ``replace`` resource's new table contents in one open transaction.

        Per target: wait for any other run finishing the same table, refuse if a newer
        lease epoch wrote the staging table, skip it if ``_quarry_finished`` says this
        run was published already; otherwise move the staging table's rows into the
        target (or rename it into place when there is no target) and record the run.
        The returned step commits, so readers switch from the old rows to the new at
        once. None when no resource replaces, or every one was published before.
        """
        targets = sorted(
            {
                self.table_name(name)
                for name, spec in scope.resources.items()
                if spec.mode is WriteMode.REPLACE
            }
        )
        if not targets:
            return None
        conn = self.connection()
        done: list[str] = []
        try:
            for target in targets:
                if self._replace(conn, scope, target):
                    done.append(target)
        except BaseException as exc:
            with contextlib.suppress(psycopg.Error):
                conn.rollback()
            if isinstance(exc, psycopg.Error):
                msg = f"cannot replace {', '.join(targets)}: {first_line(exc)}"
                raise DestinationError(scrubber.text(msg), retryable=is_transient(exc)) from None
            raise
        if not done:
            conn.rollback()
            return None
        self._pending = _Finish(conn, done)
        return self._pending.publish

    def _replace(self, conn: psycopg.Connection[Any], scope: RunScope, target: str) -> bool:
        """Stage the swap of ``target`` in the open transaction; False if it happened before."""
        schema = self.config.db_schema
        stage = stage_name(target, scope.run_id)
        meta = sql.Identifier(schema)
        conn.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
            (f"quarry replace {schema}.{target}",),
        )
        newest = conn.execute(
            sql.SQL(
                "SELECT max(epoch) FROM {}._quarry_slices WHERE dest_table = %s AND run_id = %s"
            ).format(meta),
            (stage, scope.run_id),
        ).fetchone()
        if newest is not None and newest[0] is not None and newest[0] > scope.epoch:
            msg = (
                f"{target} of {scope.run_id} was written by a newer lease epoch than {scope.epoch}"
            )
            raise LeaseLost(msg)
        finished = conn.execute(
            sql.SQL(
                "SELECT 1 FROM {}._quarry_finished WHERE dest_table = %s AND run_id = %s"
            ).format(meta),
            (target, scope.run_id),
        ).fetchone()
        if finished is not None:
            return False
        target_ident = sql.Identifier(schema, target)
        stage_ident = sql.Identifier(schema, stage)
        have_stage = _exists(conn, schema, stage)
        if have_stage and not _exists(conn, schema, target):
            conn.execute(
                sql.SQL("ALTER TABLE {} RENAME TO {}").format(stage_ident, sql.Identifier(target))
            )
            index = _slice_index(target)
            if _exists(conn, schema, _slice_index(stage)) and not _exists(conn, schema, index):
                conn.execute(
                    sql.SQL("ALTER INDEX {} RENAME TO {}").format(
                        sql.Identifier(schema, _slice_index(stage)), sql.Identifier(index)
                    )
                )
        elif have_stage:
            conn.execute(sql.SQL("DELETE FROM {}").format(target_ident))
            self._copy_stage(conn, target, stage)
            conn.execute(sql.SQL("DROP TABLE {}").format(stage_ident))
        elif _exists(conn, schema, target):
            conn.execute(sql.SQL("DELETE FROM {}").format(target_ident))  # a run without rows
        conn.execute(
            sql.SQL("DELETE FROM {}._quarry_slices WHERE dest_table = %s AND run_id = %s").format(
                meta
            ),
            (stage, scope.run_id),
        )
        conn.execute(
            sql.SQL(
                "INSERT INTO {}._quarry_finished (dest_table, run_id, epoch) VALUES (%s, %s, %s)"
            ).format(meta),
            (target, scope.run_id, scope.epoch),
        )
        conn.execute(
            sql.SQL(
                "DELETE FROM {}._quarry_finished"
                " WHERE dest_table = %s AND finished_at < now() - %s::interval"
            ).format(meta),
            (target, _FINISHED_KEPT),
        )
        return True

    def _copy_stage(self, conn: psycopg.Connection[Any], target: str, stage: str) -> None:
        """Insert the staging table's rows into the emptied target, evolving it first.

        The staging table was created like the target and drifted as an append into the
        target would have: its new columns are added, an integer column it widened is
        widened (after the delete, so no old row is rewritten), and any other type
        difference is cast on the way in.
        """
        schema = self.config.db_schema
        ident = sql.Identifier(schema, target)
        have = _table_columns(conn, schema, target)
        incoming = _table_columns(conn, schema, stage)
        for name, kind in incoming.items():
            if name not in have:
                conn.execute(
                    sql.SQL("ALTER TABLE {} ADD COLUMN {} {}").format(
                        ident, sql.Identifier(name), sql.SQL(kind)
                    )
                )
            elif have[name] != kind and have[name] in _INTEGER_TYPES and kind in _WIDER_TYPES:
                conn.execute(
                    sql.SQL("ALTER TABLE {} ALTER COLUMN {} TYPE {}").format(
                        ident, sql.Identifier(name), sql.SQL(kind)
                    )
                )
        have = _table_columns(conn, schema, target)
        values = sql.SQL(", ").join(
            sql.Identifier(n)
            if have[n] == kind
            else sql.SQL("CAST({} AS {})").format(sql.Identifier(n), sql.SQL(have[n]))
            for n, kind in incoming.items()
        )
        conn.execute(
            sql.SQL("INSERT INTO {} ({}) SELECT {} FROM {}").format(
                ident, _names(list(incoming)), values, sql.Identifier(schema, stage)
            )
        )

    def abort(self, scope: RunScope, log: Logger) -> None:
        """Remove what a failed or cancelled run must not leave; safe to call again.

        ``append`` with ``on_failure = "remove"``: the run's rows and slice claims.
        ``replace``: the run's staging table and its claims (the target is untouched).
        ``append`` with ``keep`` and ``merge``: nothing (merge's committed upserts stay).
        """
        conn = self.connection()
        schema = self.config.db_schema
        meta = sql.Identifier(schema)
        for resource, spec in sorted(scope.resources.items()):
            target = self.table_name(resource)
            try:
                with conn.transaction():
                    if spec.mode is WriteMode.APPEND and spec.on_failure == "remove":
                        if _exists(conn, schema, target):
                            conn.execute(
                                sql.SQL("DELETE FROM {} WHERE _quarry_run_id = %s").format(
                                    sql.Identifier(schema, target)
                                ),
                                (scope.run_id,),
                            )
                        claims = target
                    elif spec.mode is WriteMode.REPLACE:
                        claims = stage_name(target, scope.run_id)
                        conn.execute(
                            sql.SQL("DROP TABLE IF EXISTS {}").format(
                                sql.Identifier(schema, claims)
                            )
                        )
                    else:
                        continue
                    conn.execute(
                        sql.SQL(
                            "DELETE FROM {}._quarry_slices WHERE dest_table = %s AND run_id = %s"
                        ).format(meta),
                        (claims, scope.run_id),
                    )
            except psycopg.Error as exc:
                msg = f"cannot clean up {target} after {scope.run_id}: {first_line(exc)}"
                raise DestinationError(scrubber.text(msg), retryable=True) from None

    def describe(self) -> dict[str, Any]:
        """Kind, server (password hidden), schema and table template."""
        return {
            "type": "sql",
            "url": self.url.render_as_string(hide_password=True),
            "schema": self.config.db_schema,
            "table": self.config.table,
        }

    def close(self) -> None:
        """Close the connection (a prepared, unpublished replace is rolled back)."""
        if self._pending is not None:
            self._pending.discard()
            self._pending = None
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                self._conn.close()
            self._conn = None
