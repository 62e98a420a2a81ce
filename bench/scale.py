"""Log ingestion at scale on PostgreSQL, each figure beside its raw baseline from the same run.

``python -m bench scale`` (``make bench BENCH_ARGS=scale``):

- **64 concurrent writers**, each committing transactions of 5 entries of its own
  run as fast as it can: Quarry's flush (a log writer's ``Store.entry_flusher``:
  fenced by the run's lease, with its entry and position locks) against plain
  ``INSERT`` transactions of the same rows with no ordering at all, and, for
  reference, the same plain inserts behind one global advisory lock (what ordering
  by a single lock costs). Each kind is measured ``BENCH_SCALE_ROUNDS`` times in
  turns; the figures are medians.
- **500 runs at 5 entries a second**, each flushing its 5 entries once a second
  (phases spread), from 64 connections, beside **4 runs logging at full speed**
  (flushes of 500 entries): flush latency p50 / p99, how late flushes started,
  and entries/s, against the same load through plain inserts (and ``COPY``).

The plain baselines are raw psycopg: ``plain-1`` sends the ``INSERT`` alone in
autocommit (one round trip, as Quarry's flush is one statement), ``plain`` as
``BEGIN``, ``INSERT``, ``COMMIT``. A third, ``pooled``, sends the same plain
``INSERT`` through the store's own engine and transaction: what SQLAlchemy's client
stack costs.

Writers are processes of threads, a connection each, so that the client's Python
is spread over processes as workers' is.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import statistics
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import psycopg

from bench import ingest
from worker.models import Lease, Level, NewEntry
from worker.store import Store

PROCESSES = int(os.environ.get("BENCH_SCALE_PROCESSES", "8"))
WRITERS = int(os.environ.get("BENCH_SCALE_WRITERS", "64"))
SECONDS = float(os.environ.get("BENCH_SCALE_SECONDS", "15"))
#: The 64-writer measures are taken this many times, each kind in turn.
ROUNDS = int(os.environ.get("BENCH_SCALE_ROUNDS", "3"))
SLOW_RUNS = int(os.environ.get("BENCH_SCALE_RUNS", "500"))
FAST_RUNS = 4
FAST_PER_RUN = int(os.environ.get("BENCH_SCALE_FAST_ENTRIES", "100000"))
PER_TX = 5
#: A run logging 5 entries a second flushes them together once a second.
SLOW_PERIOD = 1.0
GLOBAL_LOCK = 0x5155_4152_5259
_INSERT = f"INSERT INTO log_entries ({ingest.COLUMNS}) VALUES " + ", ".join(
    ["(%s, %s, %s, %s, %s::jsonb, %s, %s, %s)"] * PER_TX
)


def _entries(run_id: str, epoch: int, count: int) -> list[NewEntry]:
    now = datetime.now(UTC)
    return [
        NewEntry(
            run_id,
            Level.INFO,
            "slice_completed",
            f"Slice {i}: 8,500 rows",
            now,
            {"resource": "events", "slice": i, "rows": 8500},
            "bench",
            1,
            epoch,
        )
        for i in range(count)
    ]


def _raw_params(run_id: str, count: int) -> tuple[Any, ...]:
    now = datetime.now(UTC)
    data = json.dumps({"resource": "events", "slice": 1, "rows": 8500})
    return tuple(
        value
        for i in range(count)
        for value in (run_id, "info", "slice_completed", f"Slice {i}: 8,500 rows", data,
                      "bench", 1, now)
    )  # fmt: skip


Flush = Callable[[str, int], None]


def _flusher(kind: str, url: str) -> tuple[Flush, Callable[[], None]]:
    """A function that commits one transaction of entries for ``(run_id, epoch)``."""
    if kind == "quarry":
        store = Store(url)
        writers = threading.local()

        def flush(run_id: str, epoch: int, store: Store = store) -> None:
            # Each thread is one worker process's log writer, with its own flusher.
            append = getattr(writers, "append", None)
            if append is None:
                append = writers.append = store.entry_flusher()
            refused = append(_entries(run_id, epoch, PER_TX))
            assert not refused

        return flush, store.close
    if kind == "pooled":
        pooled = Store(url)

        def plain(run_id: str, epoch: int, store: Store = pooled) -> None:
            with store._transaction() as conn:
                conn.exec_driver_sql(_INSERT, _raw_params(run_id, PER_TX))

        return plain, pooled.close
    conn_url = url.replace("postgresql+psycopg://", "postgresql://")
    local = threading.local()
    conns: list[psycopg.Connection] = []

    def raw(run_id: str, epoch: int) -> None:
        conn = getattr(local, "conn", None)
        if conn is None:
            # "plain": BEGIN, INSERT, COMMIT; "plain-1": the INSERT alone in autocommit,
            # its own transaction in one round trip (as Quarry's flush is).
            conn = local.conn = psycopg.connect(conn_url, autocommit=kind == "plain-1")
            conns.append(conn)
        with conn.cursor() as cur:
            if kind == "global-lock":
                cur.execute(f"SELECT pg_advisory_xact_lock({GLOBAL_LOCK})")
            cur.execute(_INSERT, _raw_params(run_id, PER_TX))
        if not conn.autocommit:
            conn.commit()

    def close() -> None:
        for conn in conns:
            conn.close()

    return raw, close


def _closed_loop(kind: str, url: str, leases: list[tuple[str, int]], start: Any, out: Any) -> None:
    """One process: a thread per lease, each committing flushes back to back until time is up."""
    flush, close = _flusher(kind, url)
    counts: list[int] = []
    start.wait()
    deadline = time.monotonic() + SECONDS

    def loop(run_id: str, epoch: int) -> None:
        n = 0
        while time.monotonic() < deadline:
            flush(run_id, epoch)
            n += 1
        counts.append(n)

    threads = [threading.Thread(target=loop, args=lease) for lease in leases]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    close()
    out.put(sum(counts))


def _open_loop(kind: str, url: str, leases: list[tuple[str, int]], start: Any, out: Any) -> None:
    """One process of the 500-run load: each thread serves its share of runs, a flush of
    ``PER_TX`` entries per run every ``SLOW_PERIOD`` (phases spread), and notes each
    flush's duration and how late it started."""
    flush, close = _flusher(kind, url)
    threads_n = max(1, WRITERS // PROCESSES)
    shares = [leases[i::threads_n] for i in range(threads_n)]
    durations: list[float] = []
    late: list[float] = []
    start.wait()
    began = time.monotonic()
    deadline = began + SECONDS

    def loop(share: list[tuple[str, int]]) -> None:
        rng = random.Random(share[0][0] if share else 0)  # noqa: S311 - phases, not secrets
        due = [began + rng.random() * SLOW_PERIOD for _ in share]
        mine: list[float] = []
        behind: list[float] = []
        while True:
            i = min(range(len(share)), key=due.__getitem__)
            now = time.monotonic()
            if due[i] >= deadline:
                break
            if due[i] > now:
                time.sleep(due[i] - now)
            t0 = time.monotonic()
            flush(*share[i])
            mine.append(time.monotonic() - t0)
            behind.append(t0 - due[i])
            due[i] += SLOW_PERIOD
        durations.extend(mine)
        late.extend(behind)

    threads = [threading.Thread(target=loop, args=(share,)) for share in shares if share]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    close()
    out.put((durations, late))


def _leases(url: str, count: int) -> list[tuple[str, int]]:
    store = Store(url)
    found = []
    for _ in range(count):
        run = store.create_run("bench-scale")
        lease = store.acquire(run.id, "bench", 3600, lambda lease: [])
        assert isinstance(lease, Lease)
        found.append((run.id, lease.epoch))
    store.close()
    return found


def _spread(target: Callable[..., None], kind: str, url: str, leases: list[tuple[str, int]]):  # type: ignore[no-untyped-def]
    ctx = mp.get_context("fork")
    start, out = ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(target=target, args=(kind, url, leases[i::PROCESSES], start, out))
        for i in range(PROCESSES)
    ]
    for p in procs:
        p.start()
    time.sleep(1.0)  # every process has connected and waits
    start.set()
    return procs, out


def writers_tps(url: str, kind: str) -> float:
    """Transactions/s of ``WRITERS`` writers, each on its own run, ``PER_TX`` entries each."""
    leases = _leases(url, WRITERS)
    procs, out = _spread(_closed_loop, kind, url, leases)
    total: int = sum(out.get(timeout=SECONDS + 120) for _ in procs)
    for p in procs:
        p.join()
    return total / SECONDS


def many_runs(url: str, kind: str) -> dict[str, float]:
    """The 500-run load beside 4 full-speed runs: flush latency and entries/s of each."""
    leases = _leases(url, SLOW_RUNS)
    fast = _FastRuns(url, kind)
    procs, out = _spread(_open_loop, kind, url, leases)
    began = time.monotonic()
    fast.start()
    durations: list[float] = []
    late: list[float] = []
    for _ in procs:
        d, lt = out.get(timeout=SECONDS + 120)
        durations += d
        late += lt
    elapsed = time.monotonic() - began
    for p in procs:
        p.join()
    fast_rate = fast.stop()
    durations.sort()
    late.sort()
    return {
        "flushes": len(durations),
        "p50_ms": statistics.median(durations) * 1000,
        "p99_ms": durations[int(len(durations) * 0.99)] * 1000,
        "late_p99_ms": late[int(len(late) * 0.99)] * 1000,
        "slow_entries_s": len(durations) * PER_TX / elapsed,
        "fast_entries_s": fast_rate,
    }


class _FastRuns:
    """Four runs logging as fast as they can while the 500-run load goes on."""

    def __init__(self, url: str, kind: str) -> None:
        self.url, self.kind = url, kind
        self.stopping = mp.get_context("fork").Event()
        self.out = mp.get_context("fork").Queue()
        self.procs: list[Any] = []

    def start(self) -> None:
        ctx = mp.get_context("fork")
        leases = _leases(self.url, FAST_RUNS)
        self.began = time.monotonic()
        for lease in leases:
            proc = ctx.Process(
                target=_fast, args=(self.kind, self.url, lease, self.stopping, self.out)
            )
            proc.start()
            self.procs.append(proc)

    def stop(self) -> float:
        self.stopping.set()
        total: int = sum(self.out.get(timeout=120) for _ in self.procs)
        elapsed = time.monotonic() - self.began
        for p in self.procs:
            p.join()
        return total / elapsed


def _fast(kind: str, url: str, lease: tuple[str, int], stopping: Any, out: Any) -> None:
    """A run at full speed: batches of 500 entries a flush, as the worker's writer sends a
    busy run's entries, until told to stop."""
    n = 0
    if kind == "quarry":
        store = Store(url)
        while not stopping.is_set():
            store.append_entries(_entries(lease[0], lease[1], 500))
            n += 500
        store.close()
    else:
        conn = psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"))
        rows = [
            (lease[0], "info", "slice_completed", f"Slice {i}", '{"rows": 8500}', "bench", 1,
             datetime.now(UTC))
            for i in range(500)
        ]  # fmt: skip
        while not stopping.is_set():
            with (
                conn.cursor() as cur,
                cur.copy(f"COPY log_entries ({ingest.COLUMNS}) FROM STDIN") as copy,
            ):
                for row in rows:
                    copy.write_row(row)
            conn.commit()
            n += 500
        conn.close()
    out.put(n)


def main(url: str, row: Callable[..., None]) -> None:
    """Print the scale figures through ``row`` (bench's table line)."""
    print(
        f"\n{WRITERS} writers: a connection each in {PROCESSES} processes, {PER_TX} entries a "
        f"transaction, {SECONDS:.0f} s each, {ROUNDS} rounds in turns"
    )
    kinds = ("plain-1", "plain", "pooled", "global-lock", "quarry")
    rounds: dict[str, list[float]] = {kind: [] for kind in kinds}
    for _ in range(ROUNDS):  # in turns, so drift between measures falls on every kind
        for kind in kinds:
            rounds[kind].append(writers_tps(url, kind))
    for name, kind, base, goal in (
        ("Quarry's flush (vs one autocommit INSERT)", "quarry", "plain-1", ">= 80%"),
        ("Quarry's flush (vs BEGIN, INSERT, COMMIT)", "quarry", "plain", ">= 80%"),
        ("Quarry's flush (vs plain INSERT through the store's engine)", "quarry", "pooled", ""),
        ("plain INSERT behind one global lock", "global-lock", "plain", ""),
    ):
        ours, raw = statistics.median(rounds[kind]), statistics.median(rounds[base])
        each = [a / b for a, b in zip(rounds[kind], rounds[base], strict=True)]
        row(
            f"{name}, tx/s (median of {ROUNDS})",
            f"{ours:,.0f}",
            f"{raw:,.0f}",
            f"{ours / raw:.0%} ({min(each):.0%}-{max(each):.0%})",
            goal,
        )
    print(
        f"\n{SLOW_RUNS} runs at 5 entries/s ({SLOW_RUNS * 5:,}/s offered, one flush of {PER_TX} "
        f"a second each) + {FAST_RUNS} runs at full speed (flushes of 500)"
    )
    plain = many_runs(url, "plain-1")
    quarry = many_runs(url, "quarry")
    for name, key, goal, ratio in (
        ("flush ms, p50 (vs plain INSERT)", "p50_ms", "", False),
        ("flush ms, p99 (vs plain INSERT)", "p99_ms", "<= 500 ms", False),
        ("flush started late, p99 ms", "late_p99_ms", "", False),
        ("entries/s of the 500 runs", "slow_entries_s", "", True),
        ("entries/s of the 4 full-speed runs (vs COPY)", "fast_entries_s", "", True),
    ):
        ours, raw = quarry[key], plain[key]
        share = f"{ours / raw:.0%}" if ratio else ""
        row(f"{SLOW_RUNS} runs: {name}", f"{ours:,.1f}", f"{raw:,.1f}", share, goal)


if __name__ == "__main__":  # this part alone: python -m bench.scale
    from bench.__main__ import drop_pg, fresh_pg, row

    scratch = fresh_pg("quarry_bench_scale")
    if scratch is None:
        raise SystemExit(1)
    try:
        main(scratch, row)
    finally:
        drop_pg("quarry_bench_scale")
