"""The worker's own metrics when they are off (the default), a port already taken, a scrape at start-up."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest

from worker import workermetrics
from worker.settings import Settings


def test_off_by_default_nothing_is_made_or_served(tmp_path: Path) -> None:
    """Port 0: no directory, no server, no environment; recording costs a check and does nothing."""
    assert Settings().worker_metrics_port == 0
    workermetrics.start(Settings(data_dir=tmp_path))
    assert workermetrics.MULTIPROC_ENV not in os.environ
    assert not workermetrics.directory_for(0).exists()
    workermetrics.run_began()
    workermetrics.renewed(time.monotonic())
    workermetrics.log_buffer(3)
    workermetrics.flushed(time.monotonic())
    workermetrics.run_ended()
    workermetrics.process_init()
    workermetrics.process_shutdown()
    workermetrics.stop()


def test_a_port_in_use_is_refused_before_the_directory_is_touched() -> None:
    """The port is another live worker's: its directory must survive this worker's refusal."""
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))  # noqa: S104 - the address the metrics server binds
        taken.listen()
        port = taken.getsockname()[1]
        directory = workermetrics.directory_for(port)
        directory.mkdir()
        try:
            (directory / "counter_1.db").write_bytes(b"theirs")
            with pytest.raises(OSError):
                workermetrics.start(Settings(worker_metrics_port=port))
            assert (directory / "counter_1.db").read_bytes() == b"theirs"
            assert workermetrics.MULTIPROC_ENV not in os.environ
        finally:
            for path in directory.iterdir():
                path.unlink()
            directory.rmdir()


def test_a_scrape_that_comes_before_the_series_waits_for_them(tmp_path: Path) -> None:
    """The server answers from the moment its port is bound; until the directory and the
    series exist, a scrape waits for them instead of serving a page without them."""
    live = workermetrics._LiveProcesses()
    pages: list[list[object]] = []
    scrape = threading.Thread(target=lambda: pages.append(list(live.collect())))
    scrape.start()
    scrape.join(0.2)
    assert scrape.is_alive(), "the scrape answered before the series existed"
    live.open(tmp_path)
    scrape.join(10)
    assert not scrape.is_alive()
    assert pages == [[]]  # an empty directory: nothing, and no error
