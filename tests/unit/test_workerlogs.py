"""What the worker logs and at which level: the record filter, the lost-process line, the
ready line, and the watchdog and schedule tick saying only what they did."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from billiard.einfo import ExceptionInfo
from billiard.exceptions import WorkerLostError
from celery import Celery
from celery.worker import state as worker_state
from kombu.message import Message

from scheduler import watchdog
from scheduler.ticker import Ticker
from worker import workerlogs
from worker.celery_app import EXECUTE_RUN, SCHEDULE_TICK, WATCHDOG
from worker.celery_app import app as quarry_app
from worker.consuming import QuarryTask
from worker.pipelines import Pipeline
from worker.store import Store
from worker.testing import expire_lease
from worker.workerlogs import (
    BEAT_SEND_FAILED,
    CELERY_READY,
    DISCARDED,
    NO_CONSUMERS,
    POOL_EXIT,
    QuarryRequest,
    Verdict,
    WorkerLogFilter,
    child_exit,
    classify,
    lost_status,
    lost_task_line,
    ready_line,
)

QUIET = frozenset({WATCHDOG, SCHEDULE_TICK})
SECRET = "s3cret-Pa55"


def record(
    name: str, msg: str, args: Any = (), level: int = logging.INFO, **extra: Any
) -> logging.LogRecord:
    """A record as ``logging.getLogger(name).log(level, msg, *args, extra=extra)`` makes it."""
    rec = logging.LogRecord(name, level, __file__, 1, msg, args, None)
    rec.__dict__.update(extra)
    return rec


def pool_exit(status: str) -> logging.LogRecord:
    return record("multiprocessing", POOL_EXIT, ("ForkPoolWorker-1", 4242, status), logging.ERROR)


def task_line(logger: str, name: str, fmt: str = "Task %(name)s[%(id)s] received") -> Any:
    context = {"id": "t-1", "name": name, "args": "()", "kwargs": "{}", "eta": None}
    return record(logger, fmt, (context,), data=context)


@pytest.fixture
def root_at_info() -> Iterator[None]:
    """The worker's --loglevel (the root logger's level) at INFO, as in the deploy docs."""
    root = logging.getLogger()
    before = root.level
    root.setLevel(logging.INFO)
    yield
    root.setLevel(before)


@pytest.fixture
def stopping(monkeypatch: pytest.MonkeyPatch) -> None:
    """Celery's warm shutdown flag, set as its SIGTERM handler sets it (to EX_OK, 0)."""
    monkeypatch.setattr(worker_state, "should_stop", 0)


@pytest.mark.parametrize(
    ("status", "stopping", "expected"),
    [
        ("signal 15 (SIGTERM)", True, logging.INFO),
        ("signal 15 (SIGTERM)", False, logging.WARNING),
        ("signal 9 (SIGKILL)", True, logging.WARNING),
        ("signal 9 (SIGKILL)", False, logging.WARNING),
        ("signal 11 (SIGSEGV)", True, None),
        ("signal 6 (SIGABRT)", False, None),
        ("exitcode 1", True, None),
        ("exitcode 70", False, None),
    ],
)
def test_child_exit_levels(status: str, stopping: bool, expected: int | None) -> None:
    """A stop signal is expected (INFO while the worker stops), a kill is a warning, and
    any other exit of a pool process keeps billiard's ERROR."""
    verdict = child_exit(status, stopping=stopping)
    assert (verdict.level if verdict else None) == expected
    if verdict:
        assert verdict.note


def test_classify_recognises_only_its_records() -> None:
    """Each rule matches its library's format string and nothing else."""
    assert classify(pool_exit("signal 15 (SIGTERM)"), quiet=QUIET, stopping=True) == child_exit(
        "signal 15 (SIGTERM)", stopping=True
    )
    assert classify(pool_exit("exitcode 1"), quiet=QUIET, stopping=True) is None
    other = record("multiprocessing", "Pool process %r error: %r", ("p", "x"), logging.ERROR)
    assert classify(other, quiet=QUIET, stopping=True) is None
    ready = record("celery.apps.worker", CELERY_READY, ("a@host",))
    assert classify(ready, quiet=QUIET, stopping=False) == Verdict(logging.DEBUG)
    requeue = record("kombu.transport.virtual.base", NO_CONSUMERS, ("q",), logging.WARNING)
    assert classify(requeue, quiet=QUIET, stopping=True) is not None
    assert classify(requeue, quiet=QUIET, stopping=False) is None  # not expected: keep it


@pytest.mark.parametrize("logger", ["celery.worker.strategy", "celery.app.trace"])
def test_control_tasks_per_task_lines_are_debug_runs_keep_theirs(logger: str) -> None:
    """The every-second tasks' received/succeeded lines drop to DEBUG; a run's stay INFO."""
    assert classify(task_line(logger, WATCHDOG), quiet=QUIET, stopping=False) == Verdict(
        logging.DEBUG
    )
    assert classify(task_line(logger, SCHEDULE_TICK), quiet=QUIET, stopping=False) is not None
    assert classify(task_line(logger, EXECUTE_RUN), quiet=QUIET, stopping=False) is None
    failed = task_line(logger, WATCHDOG, "Task %(name)s[%(id)s] raised unexpected: %(exc)s")
    failed.levelno, failed.levelname = logging.ERROR, "ERROR"
    assert classify(failed, quiet=QUIET, stopping=False) is None  # a failure stays an error


def test_discarded_expired_ticks_are_debug() -> None:
    """An expired tick a busy worker discards is routine; a discarded run is not."""
    tick = record("celery.worker.request", DISCARDED, (SCHEDULE_TICK, "t-1"))
    run = record("celery.worker.request", DISCARDED, (EXECUTE_RUN, "t-2"))
    assert classify(tick, quiet=QUIET, stopping=False) == Verdict(logging.DEBUG)
    assert classify(run, quiet=QUIET, stopping=False) is None


def test_the_app_wires_the_quiet_tasks_and_its_task_class() -> None:
    """worker/celery_app.py installs the corrections with its own task names."""
    assert issubclass(quarry_app.Task, QuarryTask)
    assert workerlogs._config.quiet == QUIET
    assert workerlogs._config.runs == {EXECUTE_RUN}


@pytest.mark.usefixtures("root_at_info", "stopping")
def test_filter_rewrites_a_pool_exit_during_shutdown_as_one_info_line() -> None:
    """Billiard's ERROR becomes INFO with its reason, no traceback, and is kept."""
    rec = pool_exit("signal 15 (SIGTERM)")
    rec.exc_info = (RuntimeError, RuntimeError("x"), None)
    assert WorkerLogFilter().filter(rec) is True
    assert rec.levelname == "INFO"
    assert rec.getMessage() == (
        "Process 'ForkPoolWorker-1' pid:4242 exited with 'signal 15 (SIGTERM)' "
        "(stopped with the worker)"
    )
    assert rec.exc_info is None


@pytest.mark.usefixtures("root_at_info")
def test_a_schedule_entry_beat_could_not_send_is_one_warning_line() -> None:
    """Celery beat's ERROR with a call stack and a traceback (the broker is away) becomes one
    WARNING line naming the error; beat sends the entry at its next tick."""
    error = ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")
    rec = record("celery.beat", BEAT_SEND_FAILED, (error, ["  File x, line 1\n"]), logging.ERROR)
    rec.exc_info = (ConnectionError, error, None)
    assert WorkerLogFilter().filter(rec) is True
    assert rec.levelname == "WARNING"
    assert rec.exc_info is None
    assert rec.getMessage() == (
        "Message Error: Error 111 connecting to 127.0.0.1:6379. Connection refused. "
        "(the broker is unreachable? beat sends it at the next tick)"
    )


@pytest.mark.usefixtures("root_at_info")
def test_filter_keeps_a_crash_an_error_and_drops_debug_below_the_worker_level() -> None:
    """A crash passes untouched; a line lowered to DEBUG is dropped at --loglevel info."""
    crash = pool_exit("signal 11 (SIGSEGV)")
    assert WorkerLogFilter().filter(crash) is True
    assert crash.levelname == "ERROR"
    assert WorkerLogFilter().filter(task_line("celery.app.trace", WATCHDOG)) is False
    run = task_line("celery.app.trace", EXECUTE_RUN)
    assert WorkerLogFilter().filter(run) is True
    assert run.levelname == "INFO"


def test_filter_keeps_debug_lines_at_debug_level() -> None:
    """At --loglevel debug the control tasks' lines are still there, as DEBUG."""
    root = logging.getLogger()
    before = root.level
    root.setLevel(logging.DEBUG)
    try:
        rec = task_line("celery.worker.strategy", WATCHDOG)
        assert WorkerLogFilter().filter(rec) is True
        assert rec.levelname == "DEBUG"
    finally:
        root.setLevel(before)


def test_shutting_down_reads_celerys_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    """Celery sets should_stop to EX_OK (0) on a warm shutdown: 0 means stopping."""
    monkeypatch.setattr(worker_state, "should_stop", None)
    monkeypatch.setattr(worker_state, "should_terminate", None)
    assert workerlogs.shutting_down() is False
    monkeypatch.setattr(worker_state, "should_stop", 0)
    assert workerlogs.shutting_down() is True
    monkeypatch.setattr(worker_state, "should_stop", None)
    monkeypatch.setattr(worker_state, "should_terminate", 1)
    assert workerlogs.shutting_down() is True


def test_lost_status() -> None:
    """How the process ended, from Celery's WorkerLostError or the child's SystemExit."""
    lost = WorkerLostError("Worker exited prematurely: signal 9 (SIGKILL) Job: 3.")
    assert lost_status(lost) == "signal 9 (SIGKILL)"
    assert lost_status(WorkerLostError("something else")) == "something else"
    assert lost_status(SystemExit(1)) == "exitcode 1"
    assert lost_status(SystemExit(-(256 - 15))) == "signal 15 (SIGTERM)"  # billiard's handler
    assert lost_status(ValueError("boom")) is None


def test_lost_task_line_names_the_task_the_run_and_what_recovers_it() -> None:
    """One line: the task, the run, the signal and what happens next."""
    line = lost_task_line(EXECUTE_RUN, "t-1", ["run_abc"], "signal 9 (SIGKILL)")
    assert "\n" not in line
    assert f"Task {EXECUTE_RUN}[t-1] of run run_abc" in line
    assert "signal 9 (SIGKILL)" in line
    assert "the worker re-queues the run, which resumes from its last checkpoint" in line
    other = lost_task_line(WATCHDOG, "t-2", [], "signal 15 (SIGTERM)")
    assert other == (
        f"Task {WATCHDOG}[t-2] lost its pool process (signal 15 (SIGTERM)); its message is requeued"
    )


def _request(app: Celery, name: str) -> tuple[QuarryRequest, list[bool]]:
    """A request of task ``name`` as the worker builds one from a message; and its rejects."""
    task = app.tasks[name]
    message = app.amqp.as_task_v2("t-1", name, args=["run_abc"])
    raw = Message(
        body=json.dumps(message.body),
        content_type="application/json",
        content_encoding="utf-8",
        headers=message.headers,
        delivery_info={"exchange": "", "routing_key": "q"},
    )
    requeued: list[bool] = []
    request = QuarryRequest(
        raw, app=app, task=task, on_reject=lambda _log, _errors, requeue: requeued.append(requeue)
    )
    return request, requeued


def _lost() -> ExceptionInfo:
    try:
        raise WorkerLostError("Worker exited prematurely: signal 9 (SIGKILL) Job: 0.")
    except WorkerLostError:
        return ExceptionInfo()


@pytest.mark.parametrize(
    ("name", "acks_late", "expected"),
    [
        (EXECUTE_RUN, False, "re-queued by the worker"),
        (WATCHDOG, True, "requeued"),
        (WATCHDOG, False, "error"),
    ],
)
def test_a_lost_process_is_one_warning_when_something_takes_the_task_up(
    name: str, acks_late: bool, expected: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A run (acked at its start): one warning, no traceback, no requeue; its worker re-queues
    the run (worker/consuming.py). A control task acked late and rejected on a lost worker:
    one warning, and Celery still requeues. Neither: Celery's own ERROR, traceback and all."""
    app = Celery("t", task_cls=QuarryTask, set_as_current=False)
    app.conf.update(task_acks_late=True, task_reject_on_worker_lost=True)

    @app.task(name=name, shared=False, acks_late=acks_late)
    def task(run_id: str) -> None:  # pragma: no cover - never runs
        del run_id

    request, requeued = _request(app, name)
    caplog.set_level(logging.DEBUG)
    request.on_failure(_lost())
    lines = [(r.name, r.levelname, r.getMessage(), bool(r.exc_info)) for r in caplog.records]
    if expected == "error":
        assert requeued == []
        assert [(n, lv, tb) for n, lv, _, tb in lines] == [("celery.worker.request", "ERROR", True)]
        return
    assert requeued == ([True] if expected == "requeued" else [])
    assert len(lines) == 1
    logger, level, message, traceback = lines[0]
    assert (logger, level, traceback) == ("quarry.worker", "WARNING", False)
    if name == EXECUTE_RUN:
        assert message.startswith(f"Task {EXECUTE_RUN}[t-1] of run run_abc lost its pool process")
        assert message.endswith(
            "the worker re-queues the run, which resumes from its last checkpoint"
        )
    else:
        assert message.endswith("its message is requeued")


def test_ready_line_scrubs_passwords() -> None:
    """One line: who, queues, concurrency, store and broker, with no password in it."""
    line = ready_line(
        hostname="a-1@host",
        worker_id="a",
        queues=["quarry.runs", "quarry.runs.control"],
        concurrency=2,
        pool="prefork",
        store_url=f"postgresql+psycopg://quarry:{SECRET}@db:5432/quarry",
        broker_url=f"redis://default:{SECRET}@redis:6379/0",
    )
    assert SECRET not in line
    assert line == (
        "a-1@host (worker id a) ready: queues quarry.runs, quarry.runs.control; "
        "concurrency 2 (prefork); store postgresql+psycopg://quarry:[REDACTED]@db:5432/quarry; "
        "broker redis://default:[REDACTED]@redis:6379/0"
    )


# The watchdog and the schedule tick: quiet when they did nothing, one line per action.


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(f"sqlite:///{tmp_path / 'q.db'}")
    s.upgrade()
    yield s
    s.close()


def _info_and_up(caplog: pytest.LogCaptureFixture, logger: str) -> list[tuple[str, str]]:
    return [
        (r.levelname, r.getMessage())
        for r in caplog.records
        if r.name == logger and r.levelno >= logging.INFO
    ]


def test_a_sweep_says_what_it_did_and_nothing_when_it_did_nothing(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    """Nothing to do: no line at INFO. A recovery: one WARNING naming the action and run."""
    caplog.set_level(logging.DEBUG)
    published: list[str] = []

    def sweep() -> None:
        watchdog.sweep(store, published.append, max_attempts=3, republish_after=timedelta(hours=1))

    sweep()
    assert _info_and_up(caplog, "quarry.watchdog") == []
    run = store.create_run("p")
    assert store.acquire(run.id, "ghost", 1) is not None
    expire_lease(store, run.id)
    sweep()
    assert published == [run.id]
    ((level, message),) = _info_and_up(caplog, "quarry.watchdog")
    assert level == "WARNING"
    assert message.startswith(f"watchdog recover {run.id}: lease of ghost expired")
    assert message.endswith("; attempt 2 next")


def test_a_tick_says_which_runs_it_created_and_nothing_when_none_was_due(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    """A tick with nothing due logs nothing at INFO; one that fires names the run it made."""
    caplog.set_level(logging.DEBUG)
    hourly = Pipeline.model_validate(
        {
            "name": "p",
            "source": {"type": "demo"},
            "resources": [{"name": "r"}],
            "schedule": "0 * * * *",
        }
    )
    ticker, published = Ticker(), []
    t0 = datetime(2026, 1, 1, 0, 30, tzinfo=UTC)
    for now in (t0, t0 + timedelta(seconds=1)):  # first sight starts the clock; not due
        ticker.tick(
            store, {"p": hourly}, now, publish=published.append, publish_resumed=published.append
        )
    assert _info_and_up(caplog, "quarry.scheduler") == []
    ticker.tick(
        store,
        {"p": hourly},
        t0 + timedelta(minutes=30),
        publish=published.append,
        publish_resumed=published.append,
    )
    ((level, message),) = _info_and_up(caplog, "quarry.scheduler")
    assert (level, message) == (
        "INFO",
        f"schedule tick: created {published[0]} of p for fire time 2026-01-01T01:00:00+00:00",
    )
