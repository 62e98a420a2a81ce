"""The schedule tick and the delay from a fire time to its run's lease: ``python -m bench.schedule``.

1. **Tick time.** 1,000 scheduled pipelines, each firing once a minute at its own
   second (about 17 due at every tick: 1,000 runs a minute), ticked once a second
   of virtual time over two minutes through :class:`~scheduler.ticker.Ticker` on a
   real store: the first tick (every schedule's clock started) apart from the
   others, each of which creates the due runs and "publishes" them to a list.
   Baseline: one round trip to the same database (``SELECT 1``), the least a
   tick that reads the store can cost.
2. **Fire time → lease_acquired**, on real ``celery -A worker beat`` and an
   idle worker (Redis broker, PostgreSQL store, a 1 s tick): a pipeline firing
   every two seconds, each run's ``lease_acquired`` entry against its fire
   time. Baseline: a bare beat entry every two seconds triggering a no-op task
   (:mod:`bench.noop_app`), beat's send → the task's start.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import create_engine, text

from bench.__main__ import REDIS, drop_pg, fresh_pg, row
from scheduler.ticker import Ticker
from tests.acceptance.harness import CELERY, REPO, Cluster, wait_for
from worker.models import Status
from worker.pipelines import Pipeline
from worker.store import Store

PIPELINES = int(os.environ.get("BENCH_SCHEDULE_PIPELINES", "1000"))
FIRES = int(os.environ.get("BENCH_SCHEDULE_FIRES", "20"))
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def tick_times(url: str) -> dict[str, list[float]]:
    """Milliseconds per tick: the first, the idle ones, the ones with pipelines due."""
    store = Store(url)
    pipelines = {
        f"p{i:04d}": Pipeline.model_validate(
            {
                "name": f"p{i:04d}",
                "schedule": f"{i % 60} * * * * *",
                "source": {"type": "demo"},
                "resources": [{"name": "r"}],
            }
        )
        for i in range(PIPELINES)
    }
    ticker = Ticker()
    times: dict[str, list[float]] = {"first": [], "due": []}
    published: list[str] = []
    for second in range(121):
        now = T0 + timedelta(seconds=second)
        start = time.perf_counter()
        result = ticker.tick(
            store, pipelines, now, publish=published.append, publish_resumed=published.append
        )
        took = (time.perf_counter() - start) * 1000
        times["first" if second == 0 else "due"].append(took)
        if second:
            assert result.created, "every tick has pipelines due"
    store.close()
    return times


def round_trip_ms(url: str, count: int = 200) -> list[float]:
    """One ``SELECT 1`` round trip, ``count`` times, in ms."""
    engine = create_engine(url)
    samples = []
    with engine.connect() as conn:
        for _ in range(count):
            start = time.perf_counter()
            conn.execute(text("SELECT 1"))
            samples.append((time.perf_counter() - start) * 1000)
    engine.dispose()
    return samples


def fire_to_lease(url: str) -> list[float]:
    """Seconds from each fire time to its run's ``lease_acquired``, with an idle worker."""
    tmp = Path(tempfile.mkdtemp(prefix="quarry-schedule-"))
    cluster = Cluster(tmp, database_url=url, broker_url=REDIS)
    cluster.pipelines_file.write_text(
        '[pipelines.tick]\nschedule = "*/2 * * * * *"\nmax_active_runs = 5\n'
        'destination = { type = "null" }\n'
        'source = { type = "demo", profiles = 1, events_per_slice = 1, lists = 1 }\n'
        'resources = [{ name = "profiles" }]\n'
    )
    try:
        cluster.worker("a", concurrency=2)
        wait_for(lambda: "ready" in cluster.workers[0].log(), "the worker", 60)
        cluster.beat()
        wait_for(
            lambda: len(cluster.store.list_runs(pipeline="tick", limit=1000)) >= FIRES + 1,
            "the fires",
            FIRES * 2 + 60,
        )
        cluster.workers[1].stop()
        delays = []
        runs = cluster.store.list_runs(pipeline="tick", limit=1000)
        for run in sorted(runs, key=lambda r: r.created_at)[1:]:  # the first may meet a cold worker
            cluster.wait_status(run.id, Status.SUCCEEDED, Status.FAILED, timeout=60)
            acquired = next(e for e in cluster.entries(run.id) if e.event == "lease_acquired")
            delays.append((acquired.occurred_at - run.fire_time).total_seconds())  # type: ignore[operator]
        return delays[:FIRES]
    finally:
        cluster.close()


def bare_beat() -> list[float]:
    """Seconds from a bare beat entry's send to its no-op task's start, with an idle worker."""
    tmp = Path(tempfile.mkdtemp(prefix="quarry-noop-"))
    out = tmp / "delays.txt"
    env = {
        **os.environ,
        "BENCH_NOOP_BROKER": REDIS.rsplit("/", 1)[0] + "/14",
        "BENCH_NOOP_OUT": str(out),
        "BENCH_NOOP_EVERY": "2",
    }
    common = ["-A", "bench.noop_app"]
    worker = subprocess.Popen(
        [str(CELERY), *common, "worker", "--loglevel", "warning", "--concurrency", "2", "--without-mingle",
         "--without-gossip", "--purge"],
        cwd=REPO, env=env, stdout=(tmp / "worker.log").open("wb"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    time.sleep(5)
    beat = subprocess.Popen(
        [str(CELERY), *common, "beat", "--loglevel", "warning", "--schedule", str(tmp / "beat.db")],
        cwd=REPO, env=env, stdout=(tmp / "beat.log").open("wb"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        wait_for(
            lambda: out.exists() and len(out.read_text().split()) >= FIRES + 1,
            "the no-op tasks",
            FIRES * 2 + 60,
        )
    finally:
        for proc in (beat, worker):
            proc.terminate()
            proc.wait(timeout=30)
    return [float(x) for x in out.read_text().split()][1 : FIRES + 1]


def main() -> int:
    """Print the tick and fire-to-lease figures against their baselines."""
    url = fresh_pg("quarry_bench_schedule")
    if url is None:
        return 1
    try:
        ticks = tick_times(url)
        trip = round_trip_ms(url)
    finally:
        drop_pg("quarry_bench_schedule")
    print(
        f"schedule tick, {PIPELINES:,} scheduled pipelines on PostgreSQL, one tick a second "
        "over two virtual minutes; baseline: one SELECT 1 round trip\n"
    )
    row("measure", "quarry", "raw baseline", "ratio", "goal")
    row("-" * 58, "-" * 14, "-" * 14, "-" * 8, "-" * 10)
    base = statistics.median(trip)
    due = ticks["due"]
    row(
        f"tick ms, ~{PIPELINES // 60} runs created (p50 of {len(due)})",
        f"{statistics.median(due):.2f}",
        f"{base:.2f}",
        f"{statistics.median(due) / base:.0f}x",
        "<= 50 ms",
    )
    row("tick ms, same, p99 / max", f"{pct(due, 0.99):.1f} / {max(due):.1f}", "", "", "<= 50 ms")
    row("tick ms, first tick (every clock started)", f"{ticks['first'][0]:.0f}", "", "", "")
    url = fresh_pg("quarry_bench_schedule_live")
    if url is None:
        return 1
    try:
        ours = fire_to_lease(url)
    finally:
        drop_pg("quarry_bench_schedule_live")
    raw = bare_beat()
    print(f"\nfire time -> lease_acquired, idle worker, 1 s tick, {len(ours)} fires; s")
    row(
        "fire -> lease_acquired p50 (bare beat -> no-op task start)",
        f"{statistics.median(ours):.3f}",
        f"{statistics.median(raw):.3f}",
        "",
        "",
    )
    row(
        "fire -> lease_acquired p99 (bare beat -> no-op task start)",
        f"{pct(ours, 0.99):.3f}",
        f"{pct(raw, 0.99):.3f}",
        "",
        "<= 2 s",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
