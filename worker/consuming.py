"""How a worker takes messages: the lease owns the run, so the message is acked when the run
starts, the worker never holds a message it cannot start now, it stops taking messages
before it stops its runs, and it re-queues the run of a pool process that died.

- **Early ack for runs.** ``execute_run`` is acked when a pool process accepts
  it (``acks_late=False`` on the task). RabbitMQ closes a channel holding an
  unacked delivery for longer than its ``consumer_timeout`` (30 minutes by
  default), and took the worker down with it: with late acks every run longer
  than that did. Once a run has started, its lease is what says who runs it and
  its checkpoint is what survives; the message has nothing left to protect.
  The crash paths that late acks covered are covered by the lease: a killed
  pool process is seen by the worker's main process, which re-queues the run at
  once (:func:`release_lost`); a dead machine's lease expires and the watchdog
  re-queues the run; a message lost before any process took the lease leaves
  a ``queued`` run that the watchdog re-publishes. Control tasks (watchdog,
  schedule tick, webhooks) last seconds and keep late acks.
- **No message waits in a busy worker** (:class:`Gate`). With early acks a
  broker hands a worker one more message for every run it has started, and that
  message would wait unacked behind hours of work: the consumer timeout again,
  and a run parked while other workers are idle. The gate stops consuming while
  every pool process has a task (RabbitMQ: the consumer is cancelled; Redis and
  the embedded broker: the transport's ``can_consume`` says no) and hands back
  (requeues) a message that arrives anyway, before Celery reserves it (the
  task's strategy); it consumes again when a process is free. Celery's own
  ``worker_disable_prefetch`` does the second half, for Redis only.
- **Stop taking first.** At SIGTERM the gate closes before the pool processes
  are told to stop, so the message a stopping run publishes for its resumption
  goes to a worker that will run it, not back through this one.
- **Lease notes.** A pool process notes the run and lease epoch it holds in a
  per-worker directory (one small file per process id); when the process dies,
  the main process reads the note and releases exactly that epoch.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

from celery import Task, bootsteps
from celery.worker import state as worker_state
from celery.worker.strategy import default as default_strategy

from worker import workerlogs
from worker.models import Lease
from worker.publish import publish_resumed
from worker.recovery import Action, release_lost
from worker.settings import get_settings
from worker.store import Store

log = logging.getLogger("quarry.worker")

#: The lease notes of this worker's pool processes (made by the main process before it
#: forks; its pool processes inherit the path).
_notes: Path | None = None


def open_notes() -> Path | None:
    """Make this worker's lease-notes directory (the main process, before the pool forks).

    Without one (no writable temporary directory) the worker runs as before; a killed pool
    process's run then waits for its lease to expire.
    """
    global _notes  # noqa: PLW0603 - one directory per worker process
    try:
        _notes = Path(tempfile.mkdtemp(prefix="quarry-leases-"))
    except OSError as exc:
        log.warning(
            "no lease-notes directory (%s): a killed pool process's run waits for its lease", exc
        )
        _notes = None
    return _notes


def close_notes() -> None:
    """Remove the lease-notes directory (the main process, at shutdown)."""
    global _notes  # noqa: PLW0603
    if _notes is not None:
        shutil.rmtree(_notes, ignore_errors=True)
    _notes = None


def note_lease(lease: Lease) -> None:
    """In a pool process: note the run and epoch this process now holds."""
    if _notes is None:
        return
    path = _notes / str(os.getpid())
    tmp = path.with_suffix(".tmp")
    with contextlib.suppress(OSError):
        tmp.write_text(f"{lease.run_id} {lease.epoch}\n")
        tmp.replace(path)  # a reader sees the whole note or none


def clear_note() -> None:
    """In a pool process: the run is over (or was never taken); nothing to release."""
    if _notes is not None:
        with contextlib.suppress(OSError):
            (_notes / str(os.getpid())).unlink()


def take_note(pid: int, run_id: str) -> int | None:
    """In the main process: the epoch dead process ``pid`` held on ``run_id``, if it noted one."""
    if _notes is None:
        return None
    path = _notes / str(pid)
    try:
        noted_run, epoch = path.read_text().split()
        path.unlink()
    except (OSError, ValueError):
        return None
    return int(epoch) if noted_run == run_id else None


def _release(run_id: str, epoch: int | None, how: str) -> None:
    settings = get_settings()
    store = Store(settings.store_url)
    try:
        action = release_lost(
            store, run_id, epoch, how, publish_resumed, max_attempts=settings.max_attempts
        )
    except Exception as exc:
        log.warning(
            "could not re-queue run %s after its pool process %s (%s); the watchdog will",
            run_id,
            how,
            type(exc).__name__,
        )
        return
    finally:
        store.close()
    if action is Action.RECOVER:
        log.warning("run %s re-queued at once: its pool process %s", run_id, how)
    elif action in {Action.GIVE_UP, Action.CANCEL}:
        log.warning("run %s ended: its pool process %s and it cannot go on", run_id, how)
    elif action is Action.REPUBLISH:
        log.warning("run %s published again: its pool process %s before taking it", run_id, how)


def release_lost_async(run_id: str, pid: int | None, how: str) -> threading.Thread:
    """Re-queue the run a dead pool process held, off the worker's event loop."""
    epoch = take_note(pid, run_id) if pid else None
    thread = threading.Thread(
        target=_release, args=(run_id, epoch, how), name="quarry-release", daemon=True
    )
    thread.start()
    return thread


class Gate:
    """Takes a message only when a pool process can start it now (see the module doc)."""

    def __init__(self) -> None:
        self.consumer: Any = None
        self.capacity = 0
        self.stopping = False
        self.paused = False
        self._amqp = False

    def bind(self, consumer: Any) -> None:
        """Attach to the worker's consumer (each time it connects to the broker)."""
        self.consumer = consumer
        controller = consumer.controller
        self.capacity = getattr(controller, "max_concurrency", None) or (
            consumer.pool.num_processes if consumer.pool is not None else 1
        )
        self.paused = False
        self._amqp = consumer.connection.transport.driver_type == "amqp"
        if not self._amqp:
            qos: Any = getattr(consumer.task_consumer.channel, "qos", None)
            original = getattr(qos, "can_consume", None)
            if original is not None:
                # The virtual transports (Redis, the embedded broker) ask before fetching.
                qos.can_consume = lambda: not self.full() and original()

    def full(self) -> bool:
        """Whether a new message could not start now (or the worker is stopping)."""
        return self.stopping or len(worker_state.reserved_requests) >= self.capacity

    def may_take(self) -> bool:
        """For a message just received: can a pool process start it now?"""
        return self.consumer is None or not self.full()

    def update(self) -> None:
        """Cancel or resume consuming (RabbitMQ) after the number of tasks held changed."""
        if self.consumer is None or not self._amqp:
            return
        task_consumer = self.consumer.task_consumer
        if task_consumer is None:
            return
        if self.full() and not self.paused:
            self.paused = True
            task_consumer.cancel()
        elif not self.full() and self.paused:
            self.paused = False
            task_consumer.consume()

    def stop_taking(self) -> None:
        """Take nothing more (called in the SIGTERM handler: no I/O here)."""
        self.stopping = True
        if self.consumer is not None:
            self.consumer.call_soon(self.update)


#: This worker's gate.
GATE = Gate()


#: How often the gate looks whether a pool process became free (Celery's generated request
#: class gives no hook at a task's end that a base class can extend).
GATE_INTERVAL_SECONDS = 0.1


class GateStep(bootsteps.StartStopStep):
    """The consumer bootstep that binds :data:`GATE` once the task consumer exists."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.timer_entry: Any = None

    def start(self, c: Any) -> None:
        """Bind the gate to the (re)connected consumer, and look again every 100 ms."""
        GATE.bind(c)
        self.timer_entry = c.timer.call_repeatedly(GATE_INTERVAL_SECONDS, GATE.update)

    def stop(self, c: Any) -> None:
        """Stop looking (the consumer is stopping or reconnecting)."""
        if self.timer_entry is not None:
            with contextlib.suppress(Exception):
                self.timer_entry.cancel()
            self.timer_entry = None
        GATE.consumer = None


def gated(task: Any, app: Any, consumer: Any, **kwargs: Any) -> Any:
    """Celery's default strategy behind the gate: a message no pool process can start now
    goes back to the queue before Celery reserves it."""
    handle = default_strategy(task, app, consumer, **kwargs)

    def on_message(
        message: Any, body: Any, ack: Any, reject: Any, callbacks: Any, **kw: Any
    ) -> Any:
        if not GATE.may_take():
            GATE.update()
            # Celery's reject promise, called as its requests call it: through it Celery also
            # restores a prefetch count it lowered after a reconnect.
            reject(log, consumer.connection_errors, True)
            return None
        try:
            return handle(message, body, ack, reject, callbacks, **kw)
        finally:
            GATE.update()

    return on_message


class RunRequest(workerlogs.QuarryRequest):
    """A request that also releases the lease of a run whose pool process died."""

    def on_failure(
        self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False
    ) -> Any:
        """Celery's handling; a run's lost process also has its lease released."""
        status = self.lost_process(exc_info)
        if status is not None and self.run_requeued_by_worker() and self.args:
            pid = int(self.worker_pid) if self.worker_pid else None
            release_lost_async(str(self.args[0]), pid, f"died ({status or 'was lost'})")
        return super().on_failure(exc_info, send_failed_event, return_ok)


class QuarryTask(Task[Any, Any]):
    """The app's base task class (``task_cls``): its requests go through the gate and
    report a lost pool process truthfully."""

    Request = "worker.consuming:RunRequest"
    Strategy = "worker.consuming:gated"
