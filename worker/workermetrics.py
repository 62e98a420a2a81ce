"""A worker's own metrics, scraped from the worker itself (``QUARRY_WORKER_METRICS_PORT``).

Runs execute in prefork pool processes, but Prometheus scrapes one port per
worker. prometheus_client's multiprocess mode bridges the two: every process
writes its values to memory-mapped files in one directory
(``PROMETHEUS_MULTIPROC_DIR``) and the worker's main process serves their sum.

- :func:`start`, in the main process at ``worker_init`` (before the pool forks):
  binds the port first (in use: another worker on this host owns it and its
  directory, and this worker refuses to start), then empties and creates the
  directory ``<tmp>/quarry-worker-metrics-<port>``, so no file of a previous
  worker on that port is ever read, points the environment and prometheus_client
  at it, and serves it. The directory is removed when the main process exits.
- Pool processes inherit the metric objects; prometheus_client notices the fork
  and gives each its own files. :func:`process_init` closes the inherited
  listening socket; :func:`process_shutdown` drops a process's live gauges when it
  exits, and every scrape drops those of processes that died without exiting
  (SIGKILL, OOM), so ``quarry_worker_runs_in_progress`` counts live processes only.

With the port 0 (the default) none of this happens: no directory, no server,
and the recording functions below return at once.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from worker.settings import Settings

if TYPE_CHECKING:
    from prometheus_client import Gauge, Histogram
    from prometheus_client.metrics_core import Metric

#: The environment variable prometheus_client's multiprocess mode reads.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

#: A store round trip: milliseconds, up to the seconds that threaten a lease.
RENEW_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
#: One batch of entries into the store.
FLUSH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10)

_LIVE_FILE = re.compile(r"gauge_live\w+?_(\d+)\.db")


class _Metrics:
    """The worker's series; made once, in the main process, after multiprocess mode is on."""

    def __init__(self) -> None:
        from prometheus_client import Gauge, Histogram  # noqa: PLC0415 - only when enabled

        self.runs: Gauge = Gauge(
            "quarry_worker_runs_in_progress",
            "Runs this worker's pool processes are executing.",
            multiprocess_mode="livesum",
            registry=None,
        )
        self.renew: Histogram = Histogram(
            "quarry_worker_heartbeat_renew_seconds",
            "Time of one lease renewal (a store round trip), failed ones included.",
            buckets=RENEW_BUCKETS,
            registry=None,
        )
        self.depth: Gauge = Gauge(
            "quarry_worker_log_buffer_depth",
            "Entries waiting in the run-log writers' buffers, sampled before each flush.",
            multiprocess_mode="livesum",
            registry=None,
        )
        self.flush: Histogram = Histogram(
            "quarry_worker_log_flush_seconds",
            "Time of one batch of entries written to the store, failed ones included.",
            buckets=FLUSH_BUCKETS,
            registry=None,
        )


_metrics: _Metrics | None = None
_server: Any = None
_directory: Path | None = None
_main_pid: int | None = None


def directory_for(port: int) -> Path:
    """The multiprocess directory of the worker serving ``port`` on this host."""
    return Path(tempfile.gettempdir()) / f"quarry-worker-metrics-{port}"


def start(settings: Settings) -> None:
    """Serve this worker's metrics on ``settings.worker_metrics_port`` (nothing when 0).

    Called in the worker's main process before the pool forks. Raises ``OSError`` when
    the port cannot be bound.
    """
    global _metrics, _server, _directory, _main_pid
    port = settings.worker_metrics_port
    if not port or _server is not None:
        return
    from prometheus_client import CollectorRegistry, start_http_server, values  # noqa: PLC0415

    registry = CollectorRegistry(auto_describe=False)
    live = _LiveProcesses()
    registry.register(live)
    # Bind before touching the directory: a port in use is another live worker's.
    server, _thread = start_http_server(port, registry=registry)
    directory = directory_for(port)
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(mode=0o700, parents=True)
    os.environ[MULTIPROC_ENV] = str(directory)
    # prometheus_client picks its value class at import; whatever imported it first, values
    # made from now on live in this directory's files.
    values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]
    _metrics, _server, _directory, _main_pid = _Metrics(), server, directory, os.getpid()
    live.open(directory)
    atexit.register(stop)


def stop() -> None:
    """Stop serving and remove the directory (the main process, at exit)."""
    global _server  # noqa: PLW0603
    if _main_pid != os.getpid() or _server is None:
        return
    _server.shutdown()
    _server.server_close()
    _server = None
    if _directory is not None:
        shutil.rmtree(_directory, ignore_errors=True)


def process_init() -> None:
    """In a new pool process: close the listening socket it inherited from the main process."""
    if _server is not None and os.getpid() != _main_pid:
        with contextlib.suppress(OSError):
            _server.socket.close()


def process_shutdown() -> None:
    """A pool process is exiting: its live gauges no longer count."""
    if _directory is not None and os.getpid() != _main_pid:
        from prometheus_client import multiprocess  # noqa: PLC0415

        multiprocess.mark_process_dead(os.getpid(), str(_directory))  # type: ignore[no-untyped-call]


class _LiveProcesses:
    """The directory's merged files, once the live gauges of dead processes are dropped.

    Registered before the server binds its port, and opened once the directory and the
    worker's series exist: a scrape in between waits for them, so no page ever lacks a
    series the worker has (the port is bound first, see :func:`start`).
    """

    def __init__(self) -> None:
        self.directory = Path()
        self._opened = threading.Event()

    def open(self, directory: Path) -> None:
        """Serve ``directory`` from now on."""
        self.directory = directory
        self._opened.set()

    def collect(self) -> Iterator[Metric]:
        from prometheus_client import multiprocess  # noqa: PLC0415

        if not self._opened.wait(timeout=10):
            return
        for path in self.directory.glob("gauge_live*.db"):
            match = _LIVE_FILE.fullmatch(path.name)
            pid = int(match.group(1)) if match else None
            if pid is not None and not _alive(pid):
                multiprocess.mark_process_dead(pid, str(self.directory))  # type: ignore[no-untyped-call]
        merged = multiprocess.MultiProcessCollector(None, str(self.directory))  # type: ignore[no-untyped-call]
        yield from merged.collect()  # type: ignore[no-untyped-call]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# -- recording (each returns at once when the worker serves no metrics) --------


def run_began() -> None:
    """A run's attempt started executing in this process."""
    if _metrics is not None:
        _metrics.runs.inc()


def run_ended() -> None:
    """That attempt is over, however it ended."""
    if _metrics is not None:
        _metrics.runs.dec()


def renewed(started: float) -> None:
    """A lease renewal that began at ``started`` (``time.monotonic()``) has returned."""
    if _metrics is not None:
        _metrics.renew.observe(time.monotonic() - started)


def log_buffer(depth: int) -> None:
    """The entries waiting in this process's writer, before a flush."""
    if _metrics is not None:
        _metrics.depth.set(depth)


def flushed(started: float) -> None:
    """A batch of entries that began at ``started`` has been written (or failed)."""
    if _metrics is not None:
        _metrics.flush.observe(time.monotonic() - started)
