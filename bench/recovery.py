"""Recovery times on real workers: SIGTERM → resumed elsewhere, SIGTERM → exit, a pool process
killed → resumed, a whole worker killed → resumed.

The baseline, measured in the same run, is plain dispatch: publish of a fresh
run → its ``lease_acquired`` on an idle worker (broker + worker + one acquire).
"""

from __future__ import annotations

import os
import signal
import statistics
import tempfile
import time
from pathlib import Path

from tests.acceptance.harness import Cluster, WorkerProcess, wait_for
from worker import control
from worker.models import Status

#: Lease and watchdog timings of this bench (the SIGKILL goal is TTL + period + 5 s).
TTL, RENEW, PERIOD = 6.0, 2.0, 2.0


def _holder(cluster: Cluster, run_id: str, workers: list[WorkerProcess]) -> WorkerProcess:
    owner = wait_for(lambda: cluster.store.get_run(run_id).lease_owner, "an owner")
    return next(w for w in workers if w.name == owner)


def _acquired_after(cluster: Cluster, run_id: str, t0: float) -> float:
    def find() -> float | None:
        for e in cluster.entries(run_id):
            if e.event == "lease_acquired" and e.occurred_at.timestamp() > t0:
                return e.occurred_at.timestamp()
        return None

    return float(wait_for(find, "the run to be resumed", 120)) - t0


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def measure(
    pg_url: str, broker_url: str, samples: int = 8, kills: int = 4
) -> dict[str, list[float]]:
    """Seconds for each kind of recovery, over ``samples`` SIGTERMs and child kills and
    ``kills`` SIGKILLs of a whole worker."""
    tmp = Path(tempfile.mkdtemp(prefix="quarry-recovery-"))
    cluster = Cluster(
        tmp,
        database_url=pg_url,
        broker_url=broker_url,
        lease_ttl_seconds=str(TTL),
        lease_renew_seconds=str(RENEW),
        watchdog_interval_seconds=str(PERIOD),
    )
    results: dict[str, list[float]] = {
        "dispatch": [],
        "sigterm_resume": [],
        "sigterm_exit": [],
        "child_kill_resume": [],
        "sigkill_resume": [],
    }
    serial = 0

    def spawn() -> WorkerProcess:
        nonlocal serial
        serial += 1
        return cluster.worker(f"r{serial}")

    def start() -> tuple[str, WorkerProcess]:
        run_id = cluster.trigger("slow", page_latency_ms=60)
        wait_for(lambda: cluster.slices_done(run_id) >= 2, "two slices")
        return run_id, _holder(cluster, run_id, workers)

    def done(run_id: str) -> None:
        control.cancel(cluster.store, run_id)
        cluster.wait_status(run_id, Status.CANCELLED)

    try:
        cluster.beat()
        workers = [spawn(), spawn()]
        time.sleep(4)  # both workers consuming
        for _ in range(samples):
            t0 = time.time()
            run_id = cluster.trigger("slow", page_latency_ms=60)
            results["dispatch"].append(_acquired_after(cluster, run_id, t0))
            wait_for(lambda run_id=run_id: cluster.slices_done(run_id) >= 2, "two slices")
            victim = _holder(cluster, run_id, workers)
            t0 = time.time()
            victim.proc.send_signal(signal.SIGTERM)
            results["sigterm_resume"].append(_acquired_after(cluster, run_id, t0))
            victim.proc.wait(timeout=60)
            results["sigterm_exit"].append(time.time() - t0)
            workers.remove(victim)
            workers.append(spawn())
            done(run_id)
            time.sleep(3)  # the replacement is consuming
        for _ in range(samples):
            run_id, holder = start()
            (child,) = holder.children()
            t0 = time.time()
            os.kill(child, signal.SIGKILL)  # the OOM killer's way
            results["child_kill_resume"].append(_acquired_after(cluster, run_id, t0))
            done(run_id)
        for _ in range(kills):
            run_id, victim = start()
            t0 = time.time()
            victim.signal_group(signal.SIGKILL)
            results["sigkill_resume"].append(_acquired_after(cluster, run_id, t0))
            workers.remove(victim)
            workers.append(spawn())
            done(run_id)
            time.sleep(3)
    finally:
        cluster.close()
    return results


def summary(values: list[float]) -> str:
    """p50 / p95 / max."""
    return f"p50 {statistics.median(values):.2f}s  p95 {pct(values, 0.95):.2f}s  max {max(values):.2f}s"
