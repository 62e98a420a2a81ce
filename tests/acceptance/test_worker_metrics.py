"""A real prefork worker serves its own metrics (``QUARRY_WORKER_METRICS_PORT``): its pool
processes' values summed by prometheus_client's multiprocess mode."""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.acceptance.harness import Cluster, free_port, wait_for
from worker.models import Status
from worker.workermetrics import directory_for

pytestmark = pytest.mark.acceptance

FAMILIES = {
    "quarry_worker_runs_in_progress": "gauge",
    "quarry_worker_heartbeat_renew_seconds": "histogram",
    "quarry_worker_log_buffer_depth": "gauge",
    "quarry_worker_log_flush_seconds": "histogram",
}


def scrape(port: int) -> dict[str, float] | None:
    """Unlabelled samples of the worker's page by name, or None while it does not answer."""
    try:
        response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
    except httpx.HTTPError:
        return None
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    assert {name: families[name].type for name in FAMILIES} == FAMILIES
    return {
        s.name: s.value
        for f in families.values()
        for s in f.samples
        if s.labels.get("le") in {None, "+Inf"}
    }


@pytest.fixture
def port() -> Iterator[int]:
    chosen = free_port()
    yield chosen
    # A worker killed outright leaves its directory (the next one on the port empties it).
    shutil.rmtree(directory_for(chosen), ignore_errors=True)


def test_worker_metrics_sum_the_pool_and_forget_dead_processes(tmp_path: Path, port: int) -> None:
    """Concurrency 2: a run's renewals and log flushes are counted by its pool process and served
    by the main process; a run in progress is 1 while it runs and 0 after it ends or after its
    process is killed; a stopped worker removes its directory, and a restarted one starts from
    nothing."""
    cluster = Cluster(tmp_path, worker_metrics_port=str(port))
    try:
        worker = cluster.worker("metrics", concurrency=2)
        first = wait_for(lambda: scrape(port), "the worker's metrics page")
        assert first["quarry_worker_runs_in_progress"] == 0
        assert directory_for(port).is_dir()

        run_id = cluster.trigger("slow", events_per_slice=20)  # a page a slice: a few seconds
        wait_for(lambda: (s := scrape(port)) and s["quarry_worker_runs_in_progress"] == 1, "1 run")
        cluster.wait_status(run_id, Status.SUCCEEDED)
        after = wait_for(
            lambda: (s := scrape(port)) and s["quarry_worker_runs_in_progress"] == 0 and s,
            "no run in progress",
        )
        assert after["quarry_worker_heartbeat_renew_seconds_count"] >= 1
        assert after["quarry_worker_heartbeat_renew_seconds_bucket"] >= 1  # le="+Inf"
        assert after["quarry_worker_log_flush_seconds_count"] >= 1
        assert after["quarry_worker_log_flush_seconds_sum"] > 0
        assert "quarry_worker_log_buffer_depth" in after

        worker.stop()
        assert not directory_for(port).exists()
        worker = cluster.worker("again", concurrency=2)
        fresh = wait_for(lambda: scrape(port), "the restarted worker's metrics page")
        assert fresh["quarry_worker_heartbeat_renew_seconds_count"] == 0
        assert fresh["quarry_worker_log_flush_seconds_count"] == 0

        # A pool process killed mid-run never says goodbye: its live gauge must still go.
        cluster.trigger("slow")
        wait_for(lambda: (s := scrape(port)) and s["quarry_worker_runs_in_progress"] == 1, "1 run")
        for pid in worker.children():
            os.kill(pid, signal.SIGKILL)
        wait_for(
            lambda: (s := scrape(port)) and s["quarry_worker_runs_in_progress"] == 0,
            "the killed process's run to stop counting",
        )
        worker.signal_group(signal.SIGKILL)  # nothing left to check: no need to wait for a stop
    finally:
        cluster.close()
