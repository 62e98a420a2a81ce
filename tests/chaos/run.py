"""``make chaos``: many runs across three workers while a driver keeps breaking things.

Faults: SIGTERM (main process, process group, one child), SIGKILL (child, whole
worker), SIGSTOP past the lease then SIGCONT, rolling restarts, PostgreSQL
restarts (a server of its own, stopped and started), broker outages (every
process's broker connection cut and refused for a while, through a proxy),
network partitions of one worker from PostgreSQL and the broker past its lease,
and on Redis, Redis restarts that lose every message. ``--broker redis|amqp``
picks the broker (``make chaos`` runs both).

It ends with every run checked: succeeded, no slice lost, no row or file twice,
every ``run_interrupted`` followed by a resume, and a table of faults and
recovery times per fault. Exit status 0 only when every check holds.
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from tests.acceptance.harness import (
    Cluster,
    WorkerProcess,
    expected_rows,
    temp_files,
    written_rows,
)
from tests.acceptance.proxy import TcpProxy, target_of, through
from tests.acceptance.services import PrivatePostgres, PrivateRedis
from worker.errors import StoreUnavailable
from worker.models import Entry, Run, Status

AMQP_URL = os.environ.get("QUARRY_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")

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
#: Faults that may cost a committed slice (the process dies or is cut off mid-commit).
HARD = {"sigkill_child", "sigkill_worker", "sigstop", "partition"}
#: Faults of the infrastructure: every running run is affected.
INFRA = {"pg_restart", "broker_outage", "redis_restart"}


@dataclass
class Faults:
    """What the driver did, and when, per run."""

    counts: collections.Counter[str] = field(default_factory=collections.Counter)
    #: (fault, run_id, wall time) for every run a fault hit.
    hits: list[tuple[str, str, float]] = field(default_factory=list)


class Driver:
    """Keeps three workers alive and injects faults at random."""

    def __init__(
        self,
        cluster: Cluster,
        pg: PrivatePostgres,
        broker: TcpProxy,
        redis: PrivateRedis | None,
        rng: random.Random,
    ) -> None:
        self.cluster = cluster
        self.pg = pg
        self.broker = broker  # every process's way to the broker: cut for an outage
        self.redis = redis
        self.rng = rng
        self.faults = Faults()
        self.serial = 0
        self.workers: list[WorkerProcess] = []
        #: Each worker's own proxies to the store and the broker: held for a partition.
        self.links: dict[str, tuple[TcpProxy, TcpProxy]] = {}
        self.deck: list[str] = []
        for _ in range(3):
            self.spawn()

    def spawn(self) -> WorkerProcess:
        """Start a replacement worker, behind proxies of its own."""
        self.serial += 1
        name = f"w{self.serial}"
        store_url, broker_url = (
            self.cluster.env["QUARRY_DATABASE_URL"],
            self.cluster.env["QUARRY_BROKER_URL"],
        )
        to_pg, to_broker = TcpProxy(*target_of(store_url)), TcpProxy(*target_of(broker_url))
        env = {
            **self.cluster.env,
            "QUARRY_DATABASE_URL": through(store_url, to_pg),
            "QUARRY_BROKER_URL": through(broker_url, to_broker),
        }
        w = WorkerProcess(env, name, self.cluster.tmp_path)
        self.cluster.workers.append(w)
        self.workers.append(w)
        self.links[name] = (to_pg, to_broker)
        return w

    def close(self) -> None:
        """Close every worker's proxies."""
        for to_pg, to_broker in self.links.values():
            to_pg.close()
            to_broker.close()

    def held_by(self, w: WorkerProcess) -> list[str]:
        """Runs this worker holds a lease on."""
        return [r.id for r in self.running() if r.lease_owner == w.name]

    def running(self) -> list[Run]:
        """Every running run."""
        return self.cluster.store.list_runs(status=Status.RUNNING, limit=200)

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
        kinds = ["sigterm_main", "sigterm_group", "sigterm_child", "sigkill_child",
                 "sigkill_worker", "sigstop", "rolling_restart", "pg_restart", "broker_outage",
                 "partition"]  # fmt: skip
        if self.redis is not None:
            kinds.append("redis_restart")
        if not self.deck:  # every kind once, in a random order, then again
            self.deck = self.rng.sample(kinds, len(kinds))
        kind = self.deck.pop()
        ttl = float(self.cluster.env["QUARRY_LEASE_TTL_SECONDS"])
        if kind in INFRA:
            if self.faults.counts[kind] >= 3:
                return
            now = time.time()
            hit = [r.id for r in self.running()]
            if kind == "redis_restart" and self.redis is not None:
                self.redis.stop()  # every message in it is lost
                self.redis.start()
            elif kind == "pg_restart":
                self.pg.stop()
                time.sleep(self.rng.uniform(1.0, ttl + 2))  # sometimes past the lease
                self.pg.start()
            else:
                self.broker.cut()
                time.sleep(self.rng.uniform(3.0, 15.0))
                self.broker.restore()
            self.faults.hits += [(kind, r, now) for r in hit]
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
            time.sleep(ttl + 2)
            w.signal_group(signal.SIGCONT)
        elif kind == "partition":
            links = self.links[w.name]
            for proxy in links:
                proxy.partition()
            time.sleep(ttl + 3)
            for proxy in links:
                proxy.heal()
        self.faults.hits += [(kind, r, now) for r in runs]
        self.faults.counts[kind] += 1


def recovery_times(entries: list[Entry], hits: list[tuple[str, float]]) -> dict[str, list[float]]:
    """Per fault: seconds from the fault to the run's next ``lease_acquired``, for the faults
    that took the run from its holder (the next acquire comes before the next fault on the
    run). A fault the run rode out in place (a short store outage) has no recovery."""
    acquired = sorted(e.occurred_at.timestamp() for e in entries if e.event == "lease_acquired")
    ordered = sorted(hits, key=lambda hit: hit[1])
    times: dict[str, list[float]] = collections.defaultdict(list)
    for i, (kind, at) in enumerate(ordered):
        following = ordered[i + 1][1] if i + 1 < len(ordered) else float("inf")
        later = [a for a in acquired if at < a < following]
        if later:
            times[kind].append(later[0] - at)
    return times


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
    parser.add_argument("--broker", choices=["redis", "amqp"], default="redis")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="quarry-chaos-"))
    pg = PrivatePostgres()
    redis = PrivateRedis(tmp) if args.broker == "redis" else None
    target = f"redis://127.0.0.1:{redis.port}/0" if redis is not None else AMQP_URL
    broker = TcpProxy(*target_of(target))
    cluster = Cluster(
        tmp,
        database_url=pg.url,
        broker_url=through(target, broker),
        max_attempts="50",
        lease_ttl_seconds="4",
        queued_republish_seconds="5",
    )
    cluster.pipelines_file.write_text(PIPELINE.format(latency=args.latency))
    print(
        f"chaos on {args.broker}: {args.runs} runs x {SLICES} slices, 3 workers, "
        f"seed {args.seed}, logs in {tmp}"
    )
    started = time.time()
    driver: Driver | None = None
    try:
        cluster.beat()
        driver = Driver(cluster, pg, broker, redis, rng)
        run_ids = [cluster.trigger("chaos") for _ in range(args.runs)]
        deadline = started + args.minutes * 60
        while time.time() < deadline:
            try:
                runs = [cluster.store.get_run(r) for r in run_ids]
                if all(r.status.terminal for r in runs):
                    break
                time.sleep(rng.uniform(1.5, 4.0))
                driver.inject()
                driver.reap()
            except StoreUnavailable:
                time.sleep(1)  # the driver's own reads during a store restart
        return report(cluster, driver, run_ids, time.time() - started)
    finally:
        cluster.close()
        if driver is not None:
            driver.close()
        broker.close()
        if redis is not None:
            redis.close()
        pg.close()


def report(cluster: Cluster, driver: Driver, run_ids: list[str], elapsed: float) -> int:
    """Check every run and print the table."""
    problems: list[str] = []
    expected = expected_rows(cluster, "chaos")
    recovery: dict[str, list[float]] = collections.defaultdict(list)
    restarted_partial = committed_redone = interrupted = resumed = 0
    for run_id in run_ids:
        run = cluster.store.get_run(run_id)
        entries = cluster.entries(run_id)
        hits = [(kind, t) for kind, r, t in driver.faults.hits if r == run_id]
        for kind, times in recovery_times(entries, hits).items():
            recovery[kind] += times
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
    if temp_files(cluster):
        problems.append(f"half-written temp files left: {temp_files(cluster)[:3]}")
    hard_kills = sum(driver.faults.counts[k] for k in HARD)
    if committed_redone > hard_kills:
        problems.append(f"{committed_redone} committed slices redone > {hard_kills} hard kills")

    print(f"\nfinished in {elapsed:.0f}s\n")
    print(f"{'fault':<20}{'injected':>9}{'recovered':>11}{'p50':>9}{'p95':>9}")
    for kind, count in sorted(driver.faults.counts.items()):
        times = recovery.get(kind, [])
        print(
            f"{kind:<20}{count:>9}{len(times):>11}"
            f"{percentile(times, 0.5):>9}{percentile(times, 0.95):>9}"
        )
    print("(recovered: a run the fault took from its holder resumed; a run that paused in place")
    print(" through a short store or broker outage is not a recovery)")
    print()
    succeeded = sum(cluster.store.get_run(r).status is Status.SUCCEEDED for r in run_ids)
    print(f"runs succeeded            {succeeded}/{len(run_ids)}")
    print(f"slices lost               {sum(1 for p in problems if 'missing files' in p)}")
    print(f"duplicate rows or files   {sum(1 for p in problems if 'duplicate' in p)}")
    print(f"committed slices redone   {committed_redone} (hard kills: {hard_kills})")
    print(f"partial slices restarted  {restarted_partial}")
    print(f"run_interrupted resumed   {resumed}/{interrupted}")
    watchdog = sum(
        1 for r in run_ids for e in cluster.entries(r) if e.event.startswith("watchdog_")
    )
    print(f"recoveries (watchdog)     {watchdog}")
    print("(lease TTL 4s, watchdog every 1s)")
    print(f"\n{datetime.now().isoformat(timespec='seconds')}: {'PASS' if not problems else 'FAIL'}")
    for p in problems:
        print(f"  - {p}")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
