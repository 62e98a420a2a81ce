"""A network partition of one worker, through TCP proxies the test controls (``proxy.py``):
cut off from PostgreSQL and Redis for longer than the lease TTL, mid-slice."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.acceptance.harness import (
    Cluster,
    WorkerProcess,
    expected_rows,
    temp_files,
    wait_for,
    written_rows,
)
from tests.acceptance.proxy import TcpProxy, target_of, through
from worker.models import Status

pytestmark = pytest.mark.acceptance


def test_a_partitioned_worker_is_fenced_and_goes_back_to_work(
    tmp_path: Path, pg_url: str, redis_url: str
) -> None:
    """a is cut off from the store and the broker mid-slice for longer than its lease: the
    watchdog and b take the run over; when the partition heals, a writes nothing more to
    the store or the output, says so in its own log, and then takes new work."""
    cluster = Cluster(tmp_path, database_url=pg_url, broker_url=redis_url)
    to_pg, to_redis = TcpProxy(*target_of(pg_url)), TcpProxy(*target_of(redis_url))
    try:
        cluster.beat()
        env = {
            **cluster.env,
            "QUARRY_DATABASE_URL": through(pg_url, to_pg),
            "QUARRY_BROKER_URL": through(redis_url, to_redis),
        }
        a = WorkerProcess(env, "a", tmp_path)
        cluster.workers.append(a)
        run_id = cluster.trigger("slow", page_latency_ms=100)
        wait_for(lambda: cluster.slices_done(run_id) >= 3, "a to commit some slices")
        assert cluster.store.get_run(run_id).lease_owner == "a"
        b = cluster.worker("b")
        to_pg.partition()
        to_redis.partition()
        try:
            taken = wait_for(
                lambda: next(
                    (
                        e
                        for e in cluster.entries(run_id)
                        if e.event == "lease_acquired" and e.worker_id == "b"
                    ),
                    None,
                ),
                "b to take the run over",
            )
        finally:
            to_pg.heal()
            to_redis.heal()
        run = cluster.wait_status(run_id, Status.SUCCEEDED, Status.FAILED, Status.CANCELLED)
        assert run.status is Status.SUCCEEDED, run.error_summary
        wait_for(lambda: "lease_lost" in a.log(), "a to say its lease is gone")
        entries = cluster.entries(run_id)
        # Nothing from a after the takeover: no entry, no slice, no file.
        assert [e.event for e in entries if e.worker_id == "a" and e.id > taken.id] == []
        completed = [e.data["slice"] for e in entries if e.event == "slice_completed"]
        assert sorted(completed) == list(range(1, 31))
        assert written_rows(cluster, "slow", run_id) == expected_rows(cluster, "slow")
        assert temp_files(cluster) == []
        # a goes back to work: with b gone, the next run is a's.
        b.proc.send_signal(signal.SIGTERM)
        assert b.proc.wait(timeout=30) == 0
        after = cluster.trigger("small")
        done = cluster.wait_status(after, Status.SUCCEEDED, Status.FAILED, timeout=120)
        assert done.status is Status.SUCCEEDED, done.error_summary
        assert [e.worker_id for e in cluster.entries(after) if e.event == "lease_acquired"] == ["a"]
        assert a.proc.poll() is None
    finally:
        cluster.close()
        to_pg.close()
        to_redis.close()
