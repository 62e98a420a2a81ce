"""Real ``celery -A worker worker`` processes against a real store and broker."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from celery import Celery

from tests.conftest import truncate
from worker.celery_app import celery_config, is_amqp
from worker.models import Entry, Run, Status
from worker.pipelines import ResourceConfig, get_pipeline, plan_slices
from worker.publish import send_run
from worker.settings import Settings
from worker.signals import child_pids
from worker.sources.base import ReadContext
from worker.sources.demo import DemoSource
from worker.store import Store

REPO = Path(__file__).resolve().parents[2]
CELERY = Path(sys.executable).parent / "celery"
QUARRY = Path(sys.executable).parent / "quarry"

PIPELINES = """
[pipelines.small]
max_active_runs = 20
source = { type = "demo", seed = 7, profiles = 300, events_per_slice = 40, lists = 5, page_size = 20 }
resources = [
  { name = "profiles" },
  { name = "events", slices = { start = "2026-01-01T00:00:00Z", end = "2026-01-01T12:00:00Z", step = "1h" } },
  { name = "lists" },
]

[pipelines.slow]
max_active_runs = 20
source = { type = "demo", seed = 9, profiles = 100, events_per_slice = 60, lists = 3, page_size = 20, page_latency_ms = 60 }
resources = [
  { name = "profiles" },
  { name = "events", slices = { start = "2026-01-01T00:00:00Z", end = "2026-01-02T06:00:00Z", step = "1h" } },
  { name = "lists" },
]
"""


def free_port() -> int:
    """An unused TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve_api(
    env: dict[str, str], log_path: Path, port: int | None = None
) -> tuple[subprocess.Popen[bytes], str]:
    """Start ``quarry serve`` on ``port`` (a free one by default) with ``env``; returns it and
    its base URL once up."""
    port = port or free_port()
    log = log_path.open("ab")
    proc = subprocess.Popen(
        [str(QUARRY), "serve", "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    log.close()  # the child holds its own descriptor
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(f"{base}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(up, "the API to answer", 30)
    return proc, base


def wait_for(predicate: Callable[[], Any], what: str, timeout: float = 60.0) -> Any:
    """Poll until ``predicate`` is truthy; a liveness deadline, not a speed assertion."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class WorkerProcess:
    """One ``celery -A worker worker`` (or ``beat``) in its own process group."""

    def __init__(
        self,
        env: dict[str, str],
        name: str,
        log_dir: Path,
        *,
        beat: bool = False,
        concurrency: int = 1,
    ) -> None:
        self.name = name
        self.log_path = log_dir / f"{'beat' if beat else 'worker'}-{name}.log"
        self._log = self.log_path.open("wb")
        if beat:
            schedule = log_dir / f"beat-{name}.schedule"
            argv = ["beat", "--loglevel", "info", "--schedule", str(schedule)]
        else:
            argv = [
                "worker", "--concurrency", str(concurrency), "--hostname", f"{name}-{secrets.token_hex(3)}@%h",
                "--without-mingle", "--without-gossip", "--loglevel", "info",
            ]  # fmt: skip
        self.proc = subprocess.Popen(
            [str(CELERY), "-A", "worker", *argv],
            cwd=REPO,
            env={**env, "QUARRY_WORKER_ID": name},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def children(self) -> list[int]:
        """The pool children's pids."""
        return child_pids(self.proc.pid)

    def signal_group(self, sig: signal.Signals) -> None:
        """Send ``sig`` to the worker and its pool children."""
        os.killpg(self.proc.pid, sig)

    def log(self) -> str:
        """What the worker printed so far."""
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it lingers; always reaps."""
        if self.proc.poll() is None:
            try:
                self.signal_group(signal.SIGCONT)
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(timeout=20)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                pass
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.signal_group(signal.SIGKILL)
            self.proc.wait(timeout=10)
        self._log.close()


class Cluster:
    """A store, a broker, a pipelines file and the workers started on them."""

    def __init__(
        self,
        tmp_path: Path,
        *,
        database_url: str = "",
        broker_url: str = "",
        **overrides: str,
    ) -> None:
        self.data_dir = tmp_path / "data"
        self.data_dir.mkdir()
        self.pipelines_file = tmp_path / "pipelines.toml"
        self.pipelines_file.write_text(PIPELINES)
        self.tmp_path = tmp_path
        self.settings = Settings(
            data_dir=self.data_dir,
            database_url=database_url,
            broker_url=broker_url,
            pipelines_file=self.pipelines_file,
            queue=f"quarry-test-{secrets.token_hex(4)}",
            lease_ttl_seconds=3,
            lease_renew_seconds=1,
            telemetry_sample_seconds=1,
            log_format="json",
        )
        self.env = {
            **os.environ,
            "QUARRY_DATA_DIR": str(self.data_dir),
            "QUARRY_DATABASE_URL": database_url,
            "QUARRY_BROKER_URL": broker_url,
            "QUARRY_PIPELINES_FILE": str(self.pipelines_file),
            "QUARRY_QUEUE": self.settings.queue,
            "QUARRY_LEASE_TTL_SECONDS": "3",
            "QUARRY_LEASE_RENEW_SECONDS": "1",
            "QUARRY_TELEMETRY_SAMPLE_SECONDS": "1",
            "QUARRY_LOG_FORMAT": "json",
            "QUARRY_WATCHDOG_INTERVAL_SECONDS": "1",
            "QUARRY_QUEUED_REPUBLISH_SECONDS": "4",
            "QUARRY_SHUTDOWN_GRACE_SECONDS": "15",
            **{f"QUARRY_{k.upper()}": v for k, v in overrides.items()},
        }
        self.store = Store(self.settings.store_url)
        self.store.upgrade()
        if database_url.startswith("postgresql"):
            truncate(database_url)  # the session's database is shared: start from nothing
        self.app = Celery("quarry-test")
        self.app.conf.update(celery_config(self.settings))
        self.workers: list[WorkerProcess] = []

    def worker(self, name: str, concurrency: int = 1) -> WorkerProcess:
        """Start a worker process."""
        w = WorkerProcess(self.env, name, self.tmp_path, concurrency=concurrency)
        self.workers.append(w)
        return w

    def beat(self, name: str = "beat") -> WorkerProcess:
        """Start ``celery -A worker beat`` (the watchdog every second)."""
        b = WorkerProcess(self.env, name, self.tmp_path, beat=True)
        self.workers.append(b)
        return b

    def publish(self, run_id: str) -> None:
        """Send ``execute_run(run_id)`` to the cluster's queue, as a new run."""
        send_run(self.app, self.settings.queue, run_id)

    def publish_resumed(self, run_id: str) -> None:
        """Send ``execute_run(run_id)`` as a resumed run (what the watchdog does)."""
        send_run(self.app, self.settings.queue, run_id, resume=True)

    def trigger(self, pipeline: str, **params: Any) -> str:
        """Create a run and publish it."""
        run = self.store.create_run(pipeline, params)
        self.publish(run.id)
        return run.id

    def wait_status(self, run_id: str, *statuses: Status, timeout: float = 90) -> Run:
        """Wait until the run is in one of ``statuses``."""
        return wait_for(
            lambda: (r := self.store.get_run(run_id)).status in statuses and r,
            f"{run_id} to reach {', '.join(statuses)}",
            timeout,
        )

    def entries(self, run_id: str) -> list[Entry]:
        """Every entry of the run, in id order."""
        return self.store.entries(run_id, limit=100_000)

    def slices_done(self, run_id: str) -> int:
        """How many slice_completed entries the run has."""
        return sum(e.event == "slice_completed" for e in self.entries(run_id))

    def close(self) -> None:
        """Stop every worker and close connections (and drop the test's RabbitMQ queues)."""
        for w in self.workers:
            w.stop()
        self.store.close()
        if is_amqp(self.settings.celery_broker_url):
            with self.app.connection_for_write() as conn:
                channel = conn.default_channel
                for name in (self.settings.queue, f"{self.settings.queue}.control"):
                    with contextlib.suppress(Exception):
                        channel.queue_delete(name)
        self.app.close()


def lease_recoveries(entries: list[Entry]) -> list[Entry]:
    """The watchdog's recoveries of a lost lease (each starts a next attempt).

    A loaded machine may also log a re-publish of a queued run that no worker took in
    time: the same event without ``next_attempt``, and not a lease takeover.
    """
    return [e for e in entries if e.event == "watchdog_recovery" and "next_attempt" in e.data]


def expected_rows(
    cluster: Cluster, pipeline: str, params: dict[str, Any] | None = None
) -> dict[str, list[dict[str, Any]]]:
    """What each output file must hold, by file name, computed from the deterministic source."""
    p = get_pipeline(cluster.pipelines_file, pipeline)
    source = DemoSource.from_options(
        {**p.source.options(), **(params or {}), "page_latency_ms": 0, "fail_at": None}
    )
    out: dict[str, list[dict[str, Any]]] = {}
    for resource in p.resources:
        windows = plan_slices(resource.slices) if resource.slices else [None]
        for w in windows:
            name = f"{resource.name}-{w.index:05d}.jsonl.gz" if w else f"{resource.name}.jsonl.gz"
            rows = [
                row
                for page in source.read(
                    ResourceConfig(name=resource.name), w, ReadContext(log=None)
                )
                for row in page
            ]
            out[f"{resource.name}/{name}"] = json.loads(json.dumps(rows, default=str))
    return out


def written_rows(cluster: Cluster, pipeline: str, run_id: str) -> dict[str, list[dict[str, Any]]]:
    """What each output file holds, by ``resource/file`` name."""
    root = cluster.data_dir / "output" / pipeline / run_id
    out: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(root.glob("*/*.jsonl.gz")):
        with gzip.open(path, "rt") as fh:
            out[f"{path.parent.name}/{path.name}"] = [json.loads(line) for line in fh]
    return out


def temp_files(cluster: Cluster) -> list[Path]:
    """Temporary (half-written) slice files anywhere in the output."""
    return list((cluster.data_dir / "output").rglob("*.tmp"))
