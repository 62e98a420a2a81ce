"""``make chaos``: many runs across three workers while a driver keeps breaking things.

Faults: SIGTERM (main process, process group, one child), SIGKILL (child, whole
worker), SIGSTOP past the lease then SIGCONT, rolling restarts, Redis restarts.
It ends with every run checked: succeeded, no slice lost, no row or file twice,
every ``run_interrupted`` followed by a resume, and a table of faults and
recovery times. Exit status 0 only when every check holds.
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from sqlalchemy import create_engine, text

from tests.acceptance.harness import (
    Cluster,
    WorkerProcess,
    expected_rows,
    free_port,
    temp_files,
    written_rows,
)
from worker.models import Entry, Status

PG_ADMIN = os.environ.get(
    "QUARRY_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)

PIPELINE = """
[pipelines.chaos]
max_active_runs = 100
source = {{ type = "demo", seed = 11, profiles = 200, events_per_slice = 40, lists = 4, page_size = 10, page_latency_ms = {latency} }}
resources = [
  {{ name = "profiles" }},
  {{ name = "events", slices = {{ start = "2026-01-01T00:00:00Z", end = "2026-01-03T02:00:00Z", step = "1h" }} }},
  {{ name = "lists" }},
]
"""
SLICES = 50
HARD = {"sigkill_child", "sigkill_worker", "sigstop"}


@dataclass
class Faults:
    """What the driver did, and when, per run."""

    counts: collections.Counter[str] = field(default_factory=collections.Counter)
    hard_stops: list[tuple[str, float]] = field(default_factory=list)  # (run_id, wall time)


class RedisServer:
    """A private, non-persistent redis-server this driver may restart."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            sys.exit("chaos needs redis-server on PATH")
        self.port = free_port()
        self.argv = [
            binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ]
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL)
        time.sleep(0.5)

    def restart(self) -> None:
        """Stop and start: every message in it is lost."""
        self.proc.terminate()
        self.proc.wait(timeout=10)
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL)
        time.sleep(0.5)

    def stop(self) -> None:
        """Stop for good."""
        self.proc.terminate()
        self.proc.wait(timeout=10)


def fresh_database() -> str:
    """A new PostgreSQL database for this chaos run."""
    name = f"quarry_chaos_{os.getpid()}"
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return PG_ADMIN.rsplit("/", 1)[0] + f"/{name}"


class Driver:
    """Keeps three workers alive and injects faults at random."""

    def __init__(self, cluster: Cluster, redis: RedisServer, rng: random.Random) -> None:
        self.cluster = cluster
        self.redis = redis
        self.rng = rng
        self.faults = Faults()
        self.serial = 0
        self.workers: list[WorkerProcess] = []
        for _ in range(3):
            self.spawn()

    def spawn(self) -> WorkerProcess:
        """Start a replacement worker."""
        self.serial += 1
        w = self.cluster.worker(f"w{self.serial}")
        self.workers.append(w)
        return w

    def held_by(self, w: WorkerProcess) -> list[str]:
        """Runs this worker holds a lease on."""
        return [
            r.id
            for r in self.cluster.store.list_runs(status=Status.RUNNING, limit=200)
            if r.lease_owner == w.name
        ]

    def reap(self) -> None:
        """Replace workers that exited."""
        for w in list(self.workers):
            if w.proc.poll() is not None:
                self.workers.remove(w)
                self.spawn()

    def busy_worker(self) -> WorkerProcess | None:
        """A live worker that holds a run (faults on idle workers prove little)."""
        busy = [w for w in self.workers if w.proc.poll() is None and self.held_by(w)]
        return self.rng.choice(busy) if busy else None

    def inject(self) -> None:
        """One random fault."""
        kind = self.rng.choice(
            ["sigterm_main", "sigterm_group", "sigterm_child", "sigkill_child", "sigkill_worker",
             "sigstop", "rolling_restart", "redis_restart"]
        )  # fmt: skip
        if kind == "redis_restart":
            if self.faults.counts[kind] >= 2:
                return
            self.redis.restart()
            self.faults.counts[kind] += 1
            return
        if kind == "rolling_restart":
            for w in list(self.workers):
                self.spawn()
                w.proc.send_signal(signal.SIGTERM)
                w.proc.wait(timeout=60)
                self.workers.remove(w)
            self.faults.counts[kind] += 1
            return
        w = self.busy_worker()
        if w is None:
            return
        runs = self.held_by(w)
        now = time.time()
        if kind == "sigterm_main":
            w.proc.send_signal(signal.SIGTERM)
        elif kind == "sigterm_group":
            w.signal_group(signal.SIGTERM)
        elif kind == "sigterm_child":
            for pid in w.children():
                os.kill(pid, signal.SIGTERM)
        elif kind == "sigkill_child":
            for pid in w.children():
                os.kill(pid, signal.SIGKILL)
        elif kind == "sigkill_worker":
            w.signal_group(signal.SIGKILL)
        elif kind == "sigstop":
            w.signal_group(signal.SIGSTOP)
            time.sleep(float(self.cluster.env["QUARRY_LEASE_TTL_SECONDS"]) + 2)
            w.signal_group(signal.SIGCONT)
        if kind in HARD:
            self.faults.hard_stops += [(r, now) for r in runs]
        self.faults.counts[kind] += 1


def recovery_times(
    entries: list[Entry], hard_stops: list[float]
) -> tuple[list[float], list[float]]:
    """Seconds from each interruption (graceful) or hard stop to the next lease_acquired."""
    acquired = [e.occurred_at.timestamp() for e in entries if e.event == "lease_acquired"]
    graceful = [e.occurred_at.timestamp() for e in entries if e.event == "run_interrupted"]

    def next_after(t: float) -> float | None:
        later = [a for a in acquired if a > t]
        return min(later) - t if later else None

    g = [d for t in graceful if (d := next_after(t)) is not None]
    h = [d for t in hard_stops if (d := next_after(t)) is not None]
    return g, h


def percentile(values: list[float], q: float) -> str:
    """The q-th percentile, formatted."""
    if not values:
        return "-"
    ordered = sorted(values)
    return f"{ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]:.1f}s"


def main() -> int:
    """Run the chaos scenario; print the table; exit 1 on any violated check."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--minutes", type=float, default=6.0, help="give up after this long")
    parser.add_argument("--seed", type=int, default=int(time.time()))
    parser.add_argument("--latency", type=float, default=25.0, help="ms per page")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="quarry-chaos-"))
    redis = RedisServer()
    cluster = Cluster(
        tmp,
        database_url=fresh_database(),
        broker_url=f"redis://127.0.0.1:{redis.port}/0",
        max_attempts="50",
        lease_ttl_seconds="4",
        queued_republish_seconds="5",
    )
    cluster.pipelines_file.write_text(PIPELINE.format(latency=args.latency))
    print(f"chaos: {args.runs} runs x {SLICES} slices, 3 workers, seed {args.seed}, logs in {tmp}")
    started = time.time()
    try:
        cluster.beat()
        driver = Driver(cluster, redis, rng)
        run_ids = [cluster.trigger("chaos") for _ in range(args.runs)]
        deadline = started + args.minutes * 60
        while time.time() < deadline:
            runs = [cluster.store.get_run(r) for r in run_ids]
            if all(r.status.terminal for r in runs):
                break
            time.sleep(rng.uniform(1.5, 4.0))
            driver.inject()
            driver.reap()
        return report(cluster, driver, run_ids, time.time() - started)
    finally:
        cluster.close()
        redis.stop()


def report(cluster: Cluster, driver: Driver, run_ids: list[str], elapsed: float) -> int:
    """Check every run and print the table."""
    problems: list[str] = []
    expected = expected_rows(cluster, "chaos")
    graceful_all: list[float] = []
    hard_all: list[float] = []
    restarted_partial = committed_redone = interrupted = resumed = 0
    for run_id in run_ids:
        run = cluster.store.get_run(run_id)
        entries = cluster.entries(run_id)
        if run.status is not Status.SUCCEEDED:
            problems.append(f"{run_id} ended {run.status.value}: {run.error_summary}")
            continue
        written = written_rows(cluster, "chaos", run_id)
        if written != expected:
            lost = sorted(set(expected) - set(written))
            problems.append(f"{run_id}: output differs (missing files: {lost[:5]})")
        ids = [row["id"] for rows in written.values() for row in rows]
        if len(ids) != len(set(ids)):
            problems.append(f"{run_id}: {len(ids) - len(set(ids))} duplicate rows")
        started_counts = collections.Counter(
            e.data.get("slice") for e in entries if e.event == "slice_started"
        )
        completed_counts = collections.Counter(
            e.data.get("slice") for e in entries if e.event == "slice_completed"
        )
        committed_redone += sum(c - 1 for c in completed_counts.values() if c > 1)
        restarted_partial += sum(c - 1 for c in started_counts.values() if c > 1)
        if set(completed_counts) != set(range(1, SLICES + 1)):
            problems.append(f"{run_id}: slices completed {sorted(completed_counts)[:5]}…")
        stops = [e for e in entries if e.event == "run_interrupted"]
        interrupted += len(stops)
        for stop in stops:
            if any(e.event == "lease_acquired" and e.id > stop.id for e in entries):
                resumed += 1
            else:
                problems.append(f"{run_id}: run_interrupted at entry {stop.id} never resumed")
        hard = [t for r, t in driver.faults.hard_stops if r == run_id]
        g, h = recovery_times(entries, hard)
        graceful_all += g
        hard_all += h
    if temp_files(cluster):
        problems.append(f"half-written temp files left: {temp_files(cluster)[:3]}")
    hard_kills = sum(driver.faults.counts[k] for k in HARD)
    if committed_redone > hard_kills:
        problems.append(f"{committed_redone} committed slices redone > {hard_kills} hard kills")

    print(f"\nfinished in {elapsed:.0f}s\n")
    print(f"{'fault':<20}{'injected':>9}")
    for kind, count in sorted(driver.faults.counts.items()):
        print(f"{kind:<20}{count:>9}")
    print()
    print(
        f"runs succeeded            {sum(cluster.store.get_run(r).status is Status.SUCCEEDED for r in run_ids)}/{len(run_ids)}"
    )
    print(f"slices lost               {sum(1 for p in problems if 'missing files' in p)}")
    print(f"duplicate rows or files   {sum(1 for p in problems if 'duplicate' in p)}")
    print(f"committed slices redone   {committed_redone} (hard kills: {hard_kills})")
    print(f"partial slices restarted  {restarted_partial}")
    print(f"run_interrupted resumed   {resumed}/{interrupted}")
    print(
        f"recoveries (watchdog)     {sum(1 for r in run_ids for e in cluster.entries(r) if e.event.startswith('watchdog_'))}"
    )
    print()
    print(f"{'recovery time':<28}{'n':>5}{'p50':>9}{'p95':>9}")
    print(
        f"{'graceful (SIGTERM)':<28}{len(graceful_all):>5}{percentile(graceful_all, 0.5):>9}{percentile(graceful_all, 0.95):>9}"
    )
    print(
        f"{'hard (SIGKILL/SIGSTOP)':<28}{len(hard_all):>5}{percentile(hard_all, 0.5):>9}{percentile(hard_all, 0.95):>9}"
    )
    if graceful_all:
        print(
            f"\n(mean graceful {statistics.mean(graceful_all):.1f}s; lease TTL 4s, watchdog every 1s)"
        )
    print(f"\n{datetime.now().isoformat(timespec='seconds')}: {'PASS' if not problems else 'FAIL'}")
    for p in problems:
        print(f"  - {p}")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
