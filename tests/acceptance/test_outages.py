"""Infrastructure failures on real processes and real servers: PostgreSQL restarts mid-run,
a broker outage, a full disk under the files destination.

The servers stopped here are the test's own (``services``), stopped and started as an
upgrade, a failover or a crash does it; the machine's shared servers are not touched.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from httpx_sse import connect_sse

from tests.acceptance.harness import (
    Cluster,
    expected_rows,
    lease_recoveries,
    serve_api,
    temp_files,
    wait_for,
    written_rows,
)
from tests.acceptance.proxy import TcpProxy, target_of, through
from tests.acceptance.services import PrivatePostgres, PrivateRedis
from tests.conftest import require
from worker import jsonfmt
from worker.models import Status

pytestmark = pytest.mark.acceptance

SLICES = 30


@pytest.fixture
def pg() -> Iterator[PrivatePostgres]:
    server = PrivatePostgres()
    yield server
    server.close()


def _cluster(tmp_path: Path, pg: PrivatePostgres, broker_url: str, ttl: int) -> Cluster:
    return Cluster(
        tmp_path,
        database_url=pg.url,
        broker_url=broker_url,
        lease_ttl_seconds=str(ttl),
        lease_renew_seconds="1",
    )


class StreamReader(threading.Thread):
    """One live-log client: every event of a run, from the start to its terminal event."""

    def __init__(self, base: str, run_id: str, secret: str) -> None:
        super().__init__(daemon=True)
        self.url = f"{base}/api/v1/action-runs/{run_id}/logs/stream"
        self.headers = {"Authorization": f"Bearer {secret}"}
        self.ids: list[int] = []
        self.events: list[str] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with (
                httpx.Client(timeout=httpx.Timeout(10, read=120)) as client,
                connect_sse(client, "GET", self.url, headers=self.headers) as source,
            ):
                for sse in source.iter_sse():
                    if not sse.data:  # a keep-alive comment (httpx-sse repeats the last id)
                        continue
                    self.ids.append(int(sse.id))
                    self.events.append(str(jsonfmt.loads(sse.data)["event"]))
        except BaseException as exc:  # reported by the test
            self.error = exc


def _slices_completed(cluster: Cluster, run_id: str) -> list[int]:
    return sorted(
        int(e.data["slice"]) for e in cluster.entries(run_id) if e.event == "slice_completed"
    )


def test_a_postgres_restart_mid_run_pauses_the_run_and_loses_nothing(
    tmp_path: Path, pg: PrivatePostgres, redis_url: str
) -> None:
    """PostgreSQL stopped for a few seconds (less than the lease TTL) while a run is mid-way:
    the run pauses and carries on under the same lease; every slice is committed once and
    every entry the worker printed is stored; the API answers 503 with Retry-After and
    /readyz says why; a live stream opened before the outage gets every entry once."""
    cluster = _cluster(tmp_path, pg, redis_url, ttl=20)
    api, base = serve_api(cluster.env, tmp_path / "api.log")
    try:
        _, secret = cluster.store.create_token("read")
        headers = {"Authorization": f"Bearer {secret}"}
        a = cluster.worker("a")
        run_id = cluster.trigger("slow", page_latency_ms=100)
        reader = StreamReader(base, run_id, secret)
        reader.start()
        wait_for(lambda: cluster.slices_done(run_id) >= 3, "three committed slices")
        pg.stop()
        try:
            down = httpx.get(f"{base}/api/v1/action-runs", headers=headers, timeout=30)
            assert down.status_code == 503, down.text
            assert down.headers["content-type"].startswith("application/json")
            assert int(down.headers["retry-after"]) > 0
            assert "Traceback" not in down.text
            ready = httpx.get(f"{base}/readyz", timeout=30)
            assert ready.status_code == 503
            assert ready.json()["error"]["message"].startswith("store unavailable: ")
            time.sleep(3)  # the run's next commit meets the outage
        finally:
            pg.start()
        run = cluster.wait_status(run_id, Status.SUCCEEDED, Status.FAILED, Status.CANCELLED)
        assert run.status is Status.SUCCEEDED, run.error_summary
        reader.join(timeout=60)
        assert reader.error is None, reader.error
    finally:
        api.terminate()
        api.wait(timeout=10)
        cluster.close()
    entries = cluster.entries(run_id)
    # The same lease all along: no recovery, no second attempt, nothing interrupted.
    assert run.attempt == 1
    assert [e.event for e in entries if e.event == "lease_acquired"] == ["lease_acquired"]
    assert _slices_completed(cluster, run_id) == list(range(1, SLICES + 1))
    assert written_rows(cluster, "slow", run_id) == expected_rows(cluster, "slow")
    assert temp_files(cluster) == []
    # Every event the worker printed for the run was stored (the writer held them).
    printed = [
        line
        for line in a.log().splitlines()
        if f'"run_id":"{run_id}"' in line and '"event":' in line
    ]
    stored = {(e.event, e.message) for e in entries}
    for line in printed:
        record = jsonfmt.loads(line)
        assert (record["event"], record["message"]) in stored, line
    # The stream saw every stored entry once, in order, and closed at the end.
    assert reader.ids == [e.id for e in entries]
    assert reader.events[-1] == "run_completed"
    out = a.log()
    assert "paused until it is back" in out and "the run carries on" in out
    assert "ERROR/" not in out and "Traceback" not in out, out[-3000:]


def test_an_outage_longer_than_the_lease_ends_in_the_normal_recovery(
    tmp_path: Path, pg: PrivatePostgres, redis_url: str
) -> None:
    """PostgreSQL away for longer than the lease TTL: the holder gives the run up, the
    watchdog recovers it once the database is back, and it completes with every slice once."""
    cluster = _cluster(tmp_path, pg, redis_url, ttl=3)
    try:
        cluster.beat()
        a = cluster.worker("a")
        run_id = cluster.trigger("slow", page_latency_ms=60)
        wait_for(lambda: cluster.slices_done(run_id) >= 3, "three committed slices")
        pg.stop()
        try:
            time.sleep(8)
        finally:
            pg.start()
        run = cluster.wait_status(run_id, Status.SUCCEEDED, Status.FAILED, Status.CANCELLED)
        assert run.status is Status.SUCCEEDED, run.error_summary
        assert run.attempt == 2
        assert _slices_completed(cluster, run_id) == list(range(1, SLICES + 1))
        assert written_rows(cluster, "slow", run_id) == expected_rows(cluster, "slow")
        assert temp_files(cluster) == []
        recoveries = lease_recoveries(cluster.entries(run_id))
        assert recoveries and recoveries[0].data["reason"].startswith("lease of a expired")
    finally:
        cluster.close()
    # The worker said what happened in a few warnings: no ERROR, no traceback.
    out = a.log()
    assert "the lease is given up" in out
    assert "ERROR/" not in out and "Traceback" not in out, out[-3000:]


class BrokerOutage:
    """A broker the test can take away: a Redis server of its own, killed and started
    again, or the shared RabbitMQ behind a proxy that closes and refuses connections."""

    def __init__(self, kind: str, tmp_path: Path, amqp_url: str) -> None:
        self.redis: PrivateRedis | None = None
        self.proxy: TcpProxy | None = None
        if kind == "redis":
            self.redis = PrivateRedis(tmp_path)
            self.url = self.redis.url
        else:
            self.proxy = TcpProxy(*target_of(amqp_url))
            self.url = through(amqp_url, self.proxy)

    def down(self) -> None:
        if self.redis is not None:
            self.redis.stop()
        elif self.proxy is not None:
            self.proxy.cut()

    def up(self) -> None:
        if self.redis is not None:
            self.redis.start()
        elif self.proxy is not None:
            self.proxy.restore()

    def close(self) -> None:
        if self.redis is not None:
            self.redis.close()
        if self.proxy is not None:
            self.proxy.close()


@pytest.mark.parametrize("kind", ["redis", "amqp"])
def test_a_broker_outage_loses_no_run_and_needs_no_restart(
    tmp_path: Path, pg_url: str, kind: str, request: pytest.FixtureRequest
) -> None:
    """The broker away for a while (Redis, also the stream wake-ups, killed; RabbitMQ cut
    off): the running run goes on; a run triggered meanwhile is stored, queued and run once
    the broker is back; a live stream keeps delivering (it polls); the worker and beat
    reconnect by themselves."""
    amqp_url = request.getfixturevalue("amqp_url") if kind == "amqp" else ""
    broker = BrokerOutage(kind, tmp_path, amqp_url)
    cluster = Cluster(tmp_path, database_url=pg_url, broker_url=broker.url)
    api, base = serve_api(cluster.env, tmp_path / "api.log")
    try:
        _, secret = cluster.store.create_token("operator")
        headers = {"Authorization": f"Bearer {secret}"}
        beat = cluster.beat()
        a = cluster.worker("a")
        first = cluster.trigger("slow", page_latency_ms=100)
        wait_for(lambda: cluster.slices_done(first) >= 2, "two committed slices")
        reader = StreamReader(base, first, secret)
        reader.start()
        broker.down()
        try:
            done = cluster.slices_done(first)
            wait_for(lambda: cluster.slices_done(first) >= done + 3, "slices during the outage")
            made = httpx.post(
                f"{base}/api/v1/action-runs",
                json={"pipeline": "small"},
                headers=headers,
                timeout=60,
            )
            assert made.status_code == 201, made.text
            second = made.json()["id"]
            assert cluster.store.get_run(second).status is Status.QUEUED
            wait_for(lambda: len(reader.ids) > done + 3, "the stream to deliver during the outage")
        finally:
            broker.up()
        for run_id in (first, second):
            run = cluster.wait_status(run_id, Status.SUCCEEDED, Status.FAILED, Status.CANCELLED)
            assert run.status is Status.SUCCEEDED, run.error_summary
        reader.join(timeout=60)
        assert reader.error is None, reader.error
        assert a.proc.poll() is None and beat.proc.poll() is None  # never restarted
        # Beat says it could not send a tick in one line each, without a traceback.
        assert "Traceback" not in beat.log(), beat.log()[-3000:]
    finally:
        api.terminate()
        api.wait(timeout=10)
        cluster.close()
        broker.close()
    assert _slices_completed(cluster, first) == list(range(1, SLICES + 1))
    assert reader.ids == [e.id for e in cluster.entries(first)]
    events = [e.event for e in cluster.entries(second)]
    assert events[0] == "run_unpublished"
    assert events.count("lease_acquired") == 1


@contextlib.contextmanager
def small_disk(target: Path) -> Iterator[Path]:
    """A 64 KiB filesystem (tmpfs) mounted at ``target``: full after a few slice files
    (each takes at least a 4 KiB page)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        require("mounting a tmpfs", RuntimeError("needs root and mount"))
    target.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(target)],
        check=True,
        capture_output=True,
    )
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], check=False, capture_output=True)


def test_a_full_disk_fails_the_slice_cleanly(tmp_path: Path, pg_url: str, redis_url: str) -> None:
    """The files destination runs out of space mid-run: the slice fails with a clear error,
    leaves no partial file, and the run ends run_failed; every file it did publish is whole."""
    cluster = Cluster(tmp_path, database_url=pg_url, broker_url=redis_url)
    with contextlib.ExitStack() as stack:
        stack.callback(cluster.close)
        stack.enter_context(small_disk(cluster.data_dir / "output"))
        a = cluster.worker("a")
        run_id = cluster.trigger("slow")
        run = cluster.wait_status(run_id, Status.SUCCEEDED, Status.FAILED, Status.CANCELLED)
        assert run.status is Status.FAILED
        assert run.error_summary is not None
        # The file it could not write and why, in one line.
        assert run.error_summary.startswith(
            f"cannot write slice file {cluster.data_dir / 'output' / 'slow'}/"
        ), run.error_summary
        assert run.error_summary.endswith(": No space left on device (errno 28)")
        entries = cluster.entries(run_id)
        failed = [e for e in entries if e.event == "resource_failed"]
        assert len(failed) == 1 and "No space left on device" in failed[0].message
        assert entries[-1].event == "run_failed"
        assert temp_files(cluster) == []
        # What was published is whole and checkpointed: the committed slices' files only.
        written = written_rows(cluster, "slow", run_id)  # every file reads to its end
        expected = expected_rows(cluster, "slow")
        assert written and all(written[name] == expected[name] for name in written)
        done = {e.data["slice"] for e in entries if e.event == "slice_completed"}
        assert {n for n in written if n.startswith("events/")} == {
            f"events/events-{i:05d}.jsonl.gz" for i in done
        }
        assert a.proc.poll() is None  # the worker lives on
