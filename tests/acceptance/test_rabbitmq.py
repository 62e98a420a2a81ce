"""RabbitMQ specifics on real workers: a run longer than the consumer timeout, and priorities.

The run lifecycle under SIGTERM, SIGKILL and the watchdog runs on RabbitMQ in
``test_shutdown.py`` and ``test_runs.py`` (their ``amqp`` parameters).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.acceptance.harness import Cluster, wait_for
from tests.conftest import require
from worker.models import Status

pytestmark = pytest.mark.acceptance

#: RabbitMQ checks its consumer timeout once a minute, per channel.
TIMEOUT_CHECK_SECONDS = 60


def _rabbitmqctl(*args: str) -> str:
    done = subprocess.run(
        ["rabbitmqctl", *args], capture_output=True, text=True, timeout=60, check=True
    )
    return done.stdout.strip()


@pytest.fixture
def short_consumer_timeout(amqp_url: str) -> Iterator[int]:
    """RabbitMQ's ``consumer_timeout`` at 2 s for the channels opened meanwhile (restored after)."""
    if shutil.which("rabbitmqctl") is None or os.geteuid() != 0:
        require("rabbitmqctl (as root)", RuntimeError("rabbitmqctl is not usable here"))
    before = _rabbitmqctl("eval", "application:get_env(rabbit, consumer_timeout).")
    _rabbitmqctl("eval", "application:set_env(rabbit, consumer_timeout, 2000).")
    try:
        yield 2
    finally:
        if before.startswith("{ok,"):
            value = before.removeprefix("{ok,").removesuffix("}")
            _rabbitmqctl("eval", f"application:set_env(rabbit, consumer_timeout, {value}).")
        else:
            _rabbitmqctl("eval", "application:unset_env(rabbit, consumer_timeout).")


@pytest.fixture
def cluster(tmp_path: Path, pg_url: str, amqp_url: str) -> Iterator[Cluster]:
    """A RabbitMQ + PostgreSQL cluster."""
    c = Cluster(tmp_path, database_url=pg_url, broker_url=amqp_url)
    yield c
    c.close()


def _ready_messages(cluster: Cluster) -> int:
    """Messages waiting in the runs queue (not delivered to any consumer)."""
    with cluster.app.connection_for_write() as conn:
        declared = conn.default_channel.queue_declare(cluster.settings.queue, passive=True)
    return int(declared.message_count)


def test_a_run_longer_than_the_consumer_timeout_keeps_its_worker(
    short_consumer_timeout: int, cluster: Cluster
) -> None:
    """With a 2 s consumer timeout, a run of over a minute (RabbitMQ's check interval) ends
    normally, the worker stays up, and a second run waits in the queue, not in the busy
    worker, until the first one ends."""
    a = cluster.worker("a")
    long_run = cluster.trigger("slow", page_latency_ms=800)
    cluster.wait_status(long_run, Status.RUNNING)
    behind = cluster.trigger("small")
    started = time.monotonic()
    # The busy worker (one pool process) does not take the second run's message.
    wait_for(lambda: _ready_messages(cluster) == 1, "the second run to wait in the queue")
    wait_for(
        lambda: time.monotonic() - started > TIMEOUT_CHECK_SECONDS + 5,
        "RabbitMQ's consumer-timeout check to have run",
        timeout=TIMEOUT_CHECK_SECONDS + 30,
    )
    assert cluster.store.get_run(long_run).status is Status.RUNNING
    assert cluster.store.get_run(behind).status is Status.QUEUED
    assert _ready_messages(cluster) == 1
    first = cluster.wait_status(long_run, Status.SUCCEEDED, Status.FAILED, timeout=120)
    assert first.status is Status.SUCCEEDED, first.error_summary
    second = cluster.wait_status(behind, Status.SUCCEEDED, Status.FAILED)
    assert second.status is Status.SUCCEEDED, second.error_summary
    assert a.proc.poll() is None
    assert "PRECONDITION_FAILED" not in a.log()
    assert "Unrecoverable error" not in a.log()


def test_a_resumed_run_goes_ahead_of_new_ones(cluster: Cluster) -> None:
    """Queued before any worker is up: the resumed run's message is taken first."""
    new = [cluster.store.create_run("small").id for _ in range(3)]
    for run_id in new:
        cluster.publish(run_id)
    resumed = cluster.store.create_run("small").id
    cluster.publish_resumed(resumed)
    cluster.worker("a")
    for run_id in [*new, resumed]:
        run = cluster.wait_status(run_id, Status.SUCCEEDED, Status.FAILED)
        assert run.status is Status.SUCCEEDED, run.error_summary
    order = sorted([*new, resumed], key=lambda r: cluster.store.get_run(r).started_at or 0)
    assert order[0] == resumed
