"""The worker's gate and lease notes (worker/consuming.py), on doubles of Celery's consumer.

The same paths on real workers and brokers: ``tests/acceptance/test_rabbitmq.py`` (a busy
worker leaves the next run in the queue), ``test_shutdown.py`` (a killed pool process's run
re-queued by its worker) and ``test_outages.py`` (a reconnect while a run holds the only
pool process).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from celery.worker import state as worker_state

from worker import consuming
from worker.models import Lease


class Held:
    """A task Celery holds (its reserved set is weak: keep a reference)."""


class TaskConsumer:
    """Counts what the gate asks of kombu's consumer."""

    def __init__(self) -> None:
        self.cancelled = 0
        self.consumed = 0

    def cancel(self) -> None:
        self.cancelled += 1

    def consume(self) -> None:
        self.consumed += 1


def consumer(driver: str, processes: int = 1) -> Any:
    """A double of Celery's consumer, as much of it as the gate reads."""
    qos = SimpleNamespace(can_consume=lambda: True)
    return SimpleNamespace(
        controller=SimpleNamespace(),
        pool=SimpleNamespace(num_processes=processes),
        connection=SimpleNamespace(transport=SimpleNamespace(driver_type=driver)),
        connection_errors=(ConnectionError,),
        task_consumer=SimpleNamespace(channel=SimpleNamespace(qos=qos), cancel=None, consume=None),
        call_soon=lambda fn: fn(),
    )


@pytest.fixture
def gate() -> Iterator[consuming.Gate]:
    """A fresh gate installed as the module's, with no task held."""
    saved = consuming.GATE
    consuming.GATE = consuming.Gate()
    worker_state.reserved_requests.clear()
    yield consuming.GATE
    worker_state.reserved_requests.clear()
    consuming.GATE = saved


def test_on_rabbitmq_a_full_pool_cancels_the_consumer_and_a_free_slot_resumes_it(
    gate: consuming.Gate,
) -> None:
    c = consumer("amqp")
    counts = TaskConsumer()
    c.task_consumer = counts
    gate.bind(c)
    gate.update()
    assert (counts.cancelled, counts.consumed) == (0, 0)
    held = Held()
    worker_state.reserved_requests.add(held)
    gate.update()
    gate.update()
    assert (counts.cancelled, counts.consumed, gate.paused) == (1, 0, True)
    worker_state.reserved_requests.clear()
    gate.update()
    assert (counts.cancelled, counts.consumed, gate.paused) == (1, 1, False)


def test_on_virtual_transports_the_gate_answers_can_consume(gate: consuming.Gate) -> None:
    c = consumer("redis", processes=2)
    gate.bind(c)
    qos = c.task_consumer.channel.qos
    assert qos.can_consume() is True
    first, second = Held(), Held()
    worker_state.reserved_requests.update({first, second})
    assert qos.can_consume() is False
    worker_state.reserved_requests.discard(second)
    assert qos.can_consume() is True
    gate.stop_taking()  # SIGTERM: nothing more, whatever is free
    assert qos.can_consume() is False


def test_a_message_no_process_can_start_goes_back_through_celerys_reject(
    gate: consuming.Gate, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Called as Celery's requests call their reject promise: (logger, errors, requeue)."""
    handled: list[object] = []
    monkeypatch.setattr(
        consuming, "default_strategy", lambda *_a, **_k: lambda *args, **_kw: handled.append(args)
    )
    c = consumer("amqp")
    c.task_consumer = TaskConsumer()
    gate.bind(c)
    on_message = consuming.gated(None, None, c)
    rejected: list[tuple[Any, ...]] = []

    def reject(*args: Any) -> None:
        rejected.append(args)

    on_message("m1", {}, None, reject, [])
    assert len(handled) == 1 and rejected == []
    held = Held()
    worker_state.reserved_requests.add(held)  # the only process is busy
    on_message("m2", {}, None, reject, [])
    assert len(handled) == 1
    assert rejected == [(consuming.log, (ConnectionError,), True)]


def test_a_lease_note_names_the_epoch_its_process_held(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(consuming, "_notes", tmp_path)
    consuming.note_lease(Lease("run_a", "w", 7, 1, 0.0))
    pid = int(next(tmp_path.iterdir()).name)
    assert consuming.take_note(pid, "run_b") is None  # another run's note: not released
    consuming.note_lease(Lease("run_a", "w", 8, 1, 0.0))
    assert consuming.take_note(pid, "run_a") == 8
    assert consuming.take_note(pid, "run_a") is None  # taken once
    consuming.note_lease(Lease("run_a", "w", 9, 1, 0.0))
    consuming.clear_note()
    assert list(tmp_path.iterdir()) == []
