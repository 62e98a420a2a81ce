"""Gap-free cursors without a global lock: writers that commit out of order (PostgreSQL).

Each example drives four writer sessions, each a thread holding one open
transaction at a time, through an interleaving hypothesis draws: a writer
inserts entries of some run (through each of the store's own write paths),
commits or rolls back, and a reader pages by cursor in between, across
runs (the flat view) and per run, after every step and in steps of its own. A writer that must wait for another's run lock
is seen waiting in ``pg_stat_activity`` and the interleaving goes on without it.
Whatever the order, every cursor walk must return each committed entry exactly
once, in id order.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.engine import make_url

from tests.conftest import truncate
from worker.models import Lease, Level, NewEntry
from worker.store import Store
from worker.store.entries import SMALL_BATCH, fenced_insert_sql, fenced_params

WRITERS = 4
RUNS = 3
#: The write paths: unfenced entries, a checkpoint (the fence takes the locks in its
#: RETURNING), a buffered flush of one lease (one statement, up to SMALL_BATCH entries),
#: and the log writer's flusher's statement, which autocommits: held open here, as its
#: implicit transaction is until the statement ends.
PATHS = ("plain", "checkpoint", "flush", "whole")
_clock = itertools.count()


def entry(run_id: str, n: int) -> NewEntry:
    return NewEntry(run_id, Level.INFO, "e", f"entry {n}", datetime.now(UTC), {}, "w", 1, None)


@dataclass
class Writer:
    """One writer session: a thread that opens a transaction, inserts, and waits to end it."""

    store: Store
    commands: queue.Queue[tuple[str, object]] = field(default_factory=queue.Queue)
    inserted: threading.Event = field(default_factory=threading.Event)
    ended: threading.Event = field(default_factory=threading.Event)
    pid: int | None = None
    state: str = "idle"  # idle | waiting (for a run lock) | open (inserted, not ended)
    began: int = 0  # when it last started, in steps
    failure: BaseException | None = None

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            while (command := self.commands.get())[0] != "stop":
                _, (run_id, count, lease, path) = command  # type: ignore[misc]
                with self.store._transaction() as conn:
                    raw = conn.connection.driver_connection
                    self.pid = raw.info.backend_pid  # type: ignore[union-attr]
                    entries = [entry(run_id, n) for n in range(count)]
                    if path == "flush" and count <= SMALL_BATCH:  # a writer's one-statement flush
                        assert self.store._fenced_flush(conn, run_id, lease.epoch, entries)
                    elif path == "whole" and count <= SMALL_BATCH:
                        _, params = fenced_params(run_id, lease.epoch, entries, None, whole=True)
                        sql = fenced_insert_sql(count, whole=True)
                        assert conn.exec_driver_sql(sql, params).one()[3] == count
                    else:
                        if path == "checkpoint":  # the fence takes the locks
                            self.store._fence(
                                conn, lease, {"heartbeat_at": datetime.now(UTC)}, order_entries=True
                            )
                        self.store._insert_entries(conn, entries)
                    self.inserted.set()
                    end = self.commands.get()[0]
                    if end == "rollback":
                        conn.rollback()
                self.inserted.clear()
                self.ended.set()
        except BaseException as exc:  # reported by the test, not lost in the thread
            self.failure = exc
            self.inserted.set()
            self.ended.set()

    def start(
        self, run_id: str, count: int, lease: Lease, path: str, admin: psycopg.Connection
    ) -> None:
        """Begin and insert; return once inserted, or once blocked on another's run lock."""
        self.ended.clear()
        self.pid = None
        self.began = next(_clock)
        self.commands.put(("start", (run_id, count, lease, path)))
        while not self.inserted.is_set():
            if self.pid is not None and _waits_for_lock(admin, self.pid):
                self.state = "waiting"
                return
            time.sleep(0.001)
        self.state = "open"

    def settle(self) -> None:
        """A waiting writer whose lock came free has inserted by now, or will."""
        if self.state == "waiting" and self.inserted.is_set():
            self.state = "open"

    def end(self, how: str) -> None:
        """Commit or roll back an open transaction and wait until it has ended."""
        self.commands.put((how, None))
        self.ended.wait()
        self.state = "idle"


def _waits_for_lock(admin: psycopg.Connection, pid: int) -> bool:
    row = admin.execute(
        "SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", (pid,)
    ).fetchone()
    return row is not None and row[0] == "Lock"


@dataclass
class Reader:
    """Cursor walks: across runs (the flat view) and per run, each keeping what it saw."""

    store: Store
    runs: list[str]
    start: int
    flat_cursor: int = 0
    flat: list[int] = field(default_factory=list)
    cursors: dict[str, int] = field(default_factory=dict)
    per_run: dict[str, list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.flat_cursor = self.start
        for run_id in self.runs:
            self.cursors[run_id] = self.start
            self.per_run[run_id] = []

    def read(self, page: int) -> None:
        batch = self.store.entries(after_id=self.flat_cursor, limit=page)
        self.flat.extend(e.id for e in batch if e.run_id in self.cursors)
        if batch:
            self.flat_cursor = batch[-1].id
        for run_id in self.runs:
            got = self.store.entries(run_id, after_id=self.cursors[run_id], limit=page)
            self.per_run[run_id].extend(e.id for e in got)
            if got:
                self.cursors[run_id] = got[-1].id

    def read_to_end(self) -> None:
        before = None
        while before != (self.flat_cursor, dict(self.cursors)):
            before = (self.flat_cursor, dict(self.cursors))
            self.read(1000)


#: Each step acts: ``start`` takes an idle writer, ``commit`` and ``rollback`` the k-th
#: newest open one (modulo how many are open: small k, which hypothesis favours, ends
#: the newest first, out of order); a step with no such writer does nothing.
start = st.tuples(
    st.just("start"),
    st.integers(0, RUNS - 1),
    st.integers(1, 60),  # up to 50 entries go in one INSERT, more through COPY
    st.sampled_from(PATHS),
)
end = st.tuples(st.sampled_from(["commit", "commit", "rollback"]), st.integers(0, WRITERS - 1))
#: Starts and ends weigh most: the hazard is a writer left open while later ones commit.
step = st.one_of(start, start, end, end, st.tuples(st.just("read"), st.integers(1, 7)))


def act(
    action: object,
    args: list[object],
    *,
    writers: list[Writer],
    runs: list[str],
    leases: list[Lease],
    reader: Reader,
    admin: psycopg.Connection,
) -> None:
    """One step of an interleaving."""
    if action == "start":
        r, count, path = args
        idle = [w for w in writers if w.state == "idle"]
        if idle:
            idle[0].start(runs[r], count, leases[r], str(path), admin)  # type: ignore[call-overload, index]
    elif action in ("commit", "rollback"):
        open_ = newest_open(writers)
        if open_:
            open_[int(args[0]) % len(open_)].end(str(action))  # type: ignore[call-overload]
    else:
        reader.read(int(args[0]))  # type: ignore[call-overload]


def newest_open(writers: list[Writer]) -> list[Writer]:
    return sorted((w for w in writers if w.state == "open"), key=lambda w: -w.began)


def commit_the_rest(writers: list[Writer], reader: Reader) -> None:
    """Commit what is still open, newest first, reading in between; waiting writers get
    their lock in turn."""
    while any(w.state != "idle" for w in writers):
        for writer in writers:
            writer.settle()
        open_ = newest_open(writers)
        if open_:
            open_[0].end("commit")
            reader.read(3)
        else:
            time.sleep(0.001)


@pytest.fixture(scope="module")
def pg_store(pg_url: str) -> Iterator[tuple[Store, psycopg.Connection]]:
    truncate(pg_url)
    store = Store(pg_url)
    admin_url = make_url(pg_url).set(drivername="postgresql")
    admin = psycopg.connect(admin_url.render_as_string(hide_password=False), autocommit=True)
    yield store, admin
    admin.close()
    store.close()


@settings(
    max_examples=100,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(steps=st.lists(step, min_size=8, max_size=40))
def test_cursors_never_skip_or_repeat_under_out_of_order_commits(
    pg_store: tuple[Store, psycopg.Connection], steps: list[tuple[object, ...]]
) -> None:
    store, admin = pg_store
    runs, leases = [], []
    for _ in range(RUNS):
        run = store.create_run("order")
        lease = store.acquire(run.id, "w", 60, lambda lease: [])
        assert lease is not None
        runs.append(run.id)
        leases.append(lease)
    start = max((e.id for e in store.entries(limit=1_000_000)), default=0)
    reader = Reader(store, runs, start)
    writers = [Writer(store) for _ in range(WRITERS)]
    try:
        for action, *args in steps:
            for writer in writers:
                writer.settle()
            act(action, args, writers=writers, runs=runs, leases=leases, reader=reader, admin=admin)
            reader.read(3)  # after every step too: a skip shows at the first chance
        commit_the_rest(writers, reader)
        reader.read_to_end()
    finally:
        for writer in writers:
            writer.commands.put(("stop", None))
        for writer in writers:
            writer.thread.join(timeout=30)
    for writer in writers:
        if writer.failure is not None:
            raise writer.failure
    committed = {
        run_id: [e.id for e in store.entries(run_id, after_id=start, limit=1_000_000)]
        for run_id in runs
    }
    everything = sorted(i for ids in committed.values() for i in ids)
    assert reader.flat == everything
    for run_id in runs:
        assert reader.per_run[run_id] == committed[run_id]
