"""What a worker process says about itself: each event once, at the level it deserves.

Celery and billiard log a few routine events of a Quarry worker as errors, and
log the every-second control tasks at INFO. Left alone, every rolling deploy
would fire log-based alerts and every worker log would be a tick a second. This
module corrects those records where they are made, without patching either
library:

- billiard's ``Process 'ForkPoolWorker-1' pid:… exited with 'signal 15 (SIGTERM)'``
  (ERROR, logger ``multiprocessing``): a pool process stopped by SIGTERM while
  the worker shuts down is INFO; stopped by SIGTERM otherwise, or killed
  (SIGKILL: the shutdown deadline, the OOM killer, a stuck run ended), WARNING,
  with what happens next. Any other exit (a crash, SIGSEGV) stays ERROR.
- Celery's ``Task handler raised error: WorkerLostError(…)`` with its traceback:
  the app's request class (``QuarryRequest``, under ``worker.consuming``'s)
  reports a task whose pool process was lost as one WARNING line naming the
  task, its run and what recovers it: a run is re-queued by its worker
  (:mod:`worker.consuming`), another task's message goes back to the queue
  (``task_acks_late`` and ``task_reject_on_worker_lost``). A run's state lives
  in the store under its lease, so a lost process loses nothing.
- Celery's ``Task … received`` / ``succeeded in`` / ``Discarding revoked task``
  lines of the quiet tasks (the watchdog and the schedule tick, every second)
  are DEBUG; those tasks say what they did themselves when they act.
- Celery's ``<hostname> ready.`` is replaced by one ready line that also names
  the queues, the concurrency, the store and the broker, passwords scrubbed.
- kombu's ``Requeuing undeliverable message … No consumers`` while the worker
  stops is INFO: the message goes back to the queue for another worker.
- Celery beat's ``Message Error: …`` with a call stack and a traceback, for a
  schedule entry it could not send (the broker is away), is one WARNING line:
  beat sends the entry again at its next tick.

The filters sit on those loggers only and change only the records they
recognise by their format string; a record they do not recognise passes
unchanged, so a library that rewords a line shows its original level again.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from billiard.common import human_status
from billiard.exceptions import WorkerLostError
from celery import signals as celery_signals
from celery.worker import state as worker_state
from celery.worker.request import Request

from worker.scrub import scrub
from worker.settings import get_settings

log = logging.getLogger("quarry.worker")

#: billiard's line for a pool process that exited other than cleanly (``billiard/pool.py``).
POOL_EXIT = "Process %r pid:%r exited with %r"
#: Celery's own ready line (``celery/apps/worker.py``), replaced by :func:`ready_line`.
CELERY_READY = "%s ready."
#: Celery's line for an expired or revoked message (``celery/worker/request.py``).
DISCARDED = "Discarding revoked task: %s[%s]"
#: kombu's line for a message delivered to a consumer that was just cancelled.
NO_CONSUMERS = "Requeuing undeliverable message for queue %r: No consumers."
#: Celery beat's line for a schedule entry it could not send (``celery/beat.py``), with the
#: call stack as its second argument and the traceback attached.
BEAT_SEND_FAILED = "Message Error: %s\n%s"

#: The loggers whose records :class:`WorkerLogFilter` corrects.
LOGGERS = (
    "multiprocessing",  # billiard's pool
    "celery.worker.strategy",  # Task … received
    "celery.app.trace",  # Task … succeeded in
    "celery.worker.request",  # Discarding revoked task
    "celery.apps.worker",  # <hostname> ready.
    "kombu.transport.virtual.base",  # Requeuing undeliverable message
)

_SIGNAL_STATUS = re.compile(r"signal \d+ \((?P<name>SIG[A-Z0-9]+)\)")
_LOST_STATUS = re.compile(r"exited prematurely: (?P<status>.+?)(?: Job: \d+)?\.?$")


@dataclass(frozen=True)
class Verdict:
    """A record's corrected level, and what to add to its message (nothing if empty)."""

    level: int
    note: str = ""


@dataclass
class _Config:
    runs: frozenset[str] = frozenset()
    quiet: frozenset[str] = frozenset()


_config = _Config()
_stopping = threading.Event()


def shutting_down() -> bool:
    """Whether this worker is stopping: Celery's own flags, or our shutdown hook ran."""
    stop, terminate = worker_state.should_stop, worker_state.should_terminate
    return (
        _stopping.is_set()
        or (stop is not None and stop is not False)
        or (terminate is not None and terminate is not False)
    )


def child_exit(status: str, *, stopping: bool) -> Verdict | None:
    """How a pool process's exit (billiard's ``human_status``) should be logged; ``None``
    leaves billiard's ERROR, for an exit nobody asked for."""
    match = _SIGNAL_STATUS.fullmatch(status)
    if match is None:
        return None
    name = match["name"]
    if name == "SIGTERM" and stopping:
        return Verdict(logging.INFO, "stopped with the worker")
    if name == "SIGTERM":
        return Verdict(logging.WARNING, "stopped by SIGTERM; the pool starts another")
    if name == "SIGKILL":
        return Verdict(
            logging.WARNING,
            "killed; a run it held is re-queued by this worker and resumes from its checkpoint",
        )
    return None


def task_name(record: logging.LogRecord) -> str | None:
    """The task a Celery per-task record is about, if it is one."""
    data = getattr(record, "data", None)
    if isinstance(data, Mapping):
        name = data.get("name")
        return name if isinstance(name, str) else None
    if record.msg == DISCARDED and isinstance(record.args, tuple) and record.args:
        return str(record.args[0])
    return None


def classify(
    record: logging.LogRecord, *, quiet: Collection[str], stopping: bool
) -> Verdict | None:
    """The corrected level of one record of :data:`LOGGERS`; ``None`` leaves it as it is."""
    if record.name == "multiprocessing":
        args = record.args
        if record.msg == POOL_EXIT and isinstance(args, tuple) and len(args) == 3:
            return child_exit(str(args[2]), stopping=stopping)
        return None
    if record.name == "celery.beat" and record.msg == BEAT_SEND_FAILED:
        return Verdict(logging.WARNING, "the broker is unreachable? beat sends it at the next tick")
    if record.name == "celery.apps.worker" and record.msg == CELERY_READY:
        return Verdict(logging.DEBUG)  # ready_line says it, with more
    if record.name == "kombu.transport.virtual.base":
        if record.msg == NO_CONSUMERS and stopping and record.levelno == logging.WARNING:
            return Verdict(logging.INFO, "this worker is stopping; the message goes back")
        return None
    if record.levelno == logging.INFO and task_name(record) in quiet:
        return Verdict(logging.DEBUG)
    return None


class WorkerLogFilter(logging.Filter):
    """Gives the records :func:`classify` recognises their level and note."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Correct ``record`` in place; drop it if its new level is below the worker's."""
        verdict = classify(record, quiet=_config.quiet, stopping=shutting_down())
        if verdict is None:
            return True
        # The record passed its logger's level as it was; the worker's --loglevel is the
        # root logger's (billiard's logger is pinned at ERROR, so it cannot tell).
        if not logging.getLogger().isEnabledFor(verdict.level):
            return False
        record.levelno, record.levelname = verdict.level, logging.getLevelName(verdict.level)
        if record.msg == BEAT_SEND_FAILED and isinstance(record.args, tuple) and record.args:
            record.msg, record.args = "Message Error: %s", record.args[:1]  # not the stack
        if verdict.note:
            record.msg, record.args = f"{record.getMessage()} ({verdict.note})", ()
        record.exc_info, record.exc_text = None, None
        return True


_filter = WorkerLogFilter()


def lost_status(exc: BaseException) -> str | None:
    """How the pool process of a task ended, when ``exc`` says it was lost; else ``None``."""
    if isinstance(exc, WorkerLostError):
        text = str(exc)
        match = _LOST_STATUS.search(text)
        return match["status"] if match else text
    if isinstance(exc, SystemExit | KeyboardInterrupt):
        code = exc.code if isinstance(exc, SystemExit) else 1
        if not isinstance(code, int):
            code = 0 if code is None else 1
        if -256 < code < -128:  # billiard's SIGTERM handler exits with -(256 - signum)
            code = -(256 + code)
        return str(human_status(code))
    return None


def is_run_task(name: str) -> bool:
    """Whether ``name`` is a task that executes a run."""
    return name in _config.runs


def own_doing(request: Request) -> bool:
    """Whether the worker itself ended the task's process (it cancelled or revoked it)."""
    return bool(
        getattr(request, "_already_cancelled", False) or getattr(request, "_already_revoked", False)
    )


def lost_task_line(name: str, task_id: str, args: Sequence[Any] | None, status: str) -> str:
    """The one line for a task whose pool process was lost: a run is re-queued by its worker
    (:mod:`worker.consuming`), any other task's message is requeued."""
    if name in _config.runs and args:
        return (
            f"Task {name}[{task_id}] of run {args[0]} lost its pool process ({status}); "
            "the worker re-queues the run, which resumes from its last checkpoint"
        )
    return f"Task {name}[{task_id}] lost its pool process ({status}); its message is requeued"


class QuarryRequest(Request):
    """Celery's request, reporting a lost pool process as one WARNING line, no traceback."""

    def lost_process(self, exc_info: Any) -> str | None:
        """How this task's pool process ended, when the failure is that it was lost and the
        worker did not end it itself (by cancelling or revoking the task); else ``None``."""
        exc = exc_info.exception
        exc = getattr(exc, "exc", exc)  # billiard's ExceptionWithTraceback
        if not isinstance(exc, BaseException) or own_doing(self):
            return None
        return lost_status(exc)

    def run_requeued_by_worker(self) -> bool:
        """Whether this task executes a run acked at its start, which the worker re-queues
        itself when the pool process is lost (:mod:`worker.consuming`)."""
        return is_run_task(self.name) and not self.task.acks_late

    def on_failure(
        self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False
    ) -> Any:
        """Log a lost process of a requeued task as a warning; everything else as Celery does."""
        status = self.lost_process(exc_info)
        # Celery rejects the message for a requeue exactly when both are set; a run's
        # message was acked at its start and the worker re-queues the run itself.
        requeued = self.task.acks_late and self.task.reject_on_worker_lost
        if status is not None and (requeued or self.run_requeued_by_worker()) and not return_ok:
            log.warning(lost_task_line(self.name, self.id, self.args, status))
            return_ok = True  # so Celery skips its ERROR line and traceback
        return super().on_failure(exc_info, send_failed_event, return_ok)


def ready_line(
    *,
    hostname: str,
    worker_id: str,
    queues: Iterable[str],
    concurrency: object,
    pool: str,
    store_url: str,
    broker_url: str,
) -> str:
    """The worker's one ready line; URLs go through the scrubber."""
    who = f"{hostname} (worker id {worker_id})" if worker_id else hostname
    return (
        f"{who} ready: queues {', '.join(queues)}; concurrency {concurrency} ({pool}); "
        f"store {scrub(store_url)}; broker {scrub(broker_url)}"
    )


def _on_worker_init(**_kwargs: Any) -> None:
    # The main process, before the pool forks: its children inherit the filters.
    for name in LOGGERS:
        logging.getLogger(name).addFilter(_filter)


def _on_beat_init(**_kwargs: Any) -> None:
    logging.getLogger("celery.beat").addFilter(_filter)


def _on_shutting_down(**_kwargs: Any) -> None:
    _stopping.set()


def _on_ready(sender: Any = None, **_kwargs: Any) -> None:
    controller = sender.controller
    pool = controller.pool_cls
    pool_name = pool if isinstance(pool, str) else pool.__module__
    settings = get_settings()
    line = ready_line(
        hostname=sender.hostname,
        worker_id=settings.worker_id,
        queues=sorted(sender.app.amqp.queues.consume_from),
        concurrency=controller.concurrency,
        pool=pool_name.rsplit(".", 1)[-1],
        store_url=settings.store_url,
        broker_url=settings.celery_broker_url,
    )
    log.info("%s", line)


def install(*, runs: Iterable[str], quiet: Iterable[str]) -> None:
    """Wire the worker's log corrections: ``runs`` are the tasks that execute a run (their
    lost process names the run), ``quiet`` the every-second tasks logged at DEBUG."""
    _config.runs, _config.quiet = frozenset(runs), frozenset(quiet)
    celery_signals.worker_init.connect(_on_worker_init, weak=False)
    celery_signals.worker_shutting_down.connect(_on_shutting_down, weak=False)
    celery_signals.worker_ready.connect(_on_ready, weak=False)
    celery_signals.beat_init.connect(_on_beat_init, weak=False)
