"""structlog events become entries: buffered, batched, held for state changes, scrubbed."""

from __future__ import annotations

import contextlib
import io
import json
import threading
from collections.abc import Sequence
from datetime import datetime, timedelta

import pytest
import structlog
from structlog.testing import capture_logs

from worker import runlog
from worker.models import Level, NewEntry
from worker.runlog import EntryWriter, StoreSink


class FakeAppend:
    """Records batches the writer stores."""

    def __init__(self, fail_times: int = 0) -> None:
        self.batches: list[list[NewEntry]] = []
        self.fail_times = fail_times
        self.lock = threading.Lock()

    def __call__(self, entries: Sequence[NewEntry]) -> set[tuple[str, int]]:
        with self.lock:
            if self.fail_times:
                self.fail_times -= 1
                raise ConnectionError("database away")
            self.batches.append(list(entries))
        return set()


def configured(writer: EntryWriter | None) -> tuple[StoreSink, io.StringIO]:
    """Install the pipeline with a sink and a captured stdout."""
    out = io.StringIO()
    sink = StoreSink(writer, max_message_bytes=300)
    runlog.configure(sink, log_format="json", stream=out)
    return sink, out


def teardown_function() -> None:
    """Leave structlog as tests found it."""
    structlog.reset_defaults()


def test_event_becomes_entry_with_context_split_from_data() -> None:
    """Bound context becomes entry fields; the rest of the event is ``data``."""
    append = FakeAppend()
    writer = EntryWriter(append, flush_ms=10_000)
    _, out = configured(writer)
    log = runlog.get_logger(run_id="run_1", worker_id="w1").bind(attempt=2, epoch=5)
    log.warning("resource_failed", message="Failed events", resource="events", rows=3)
    writer.flush()
    (entry,) = append.batches[0]
    assert (entry.run_id, entry.worker_id, entry.attempt, entry.epoch) == ("run_1", "w1", 2, 5)
    assert entry.level is Level.WARNING
    assert entry.event == "resource_failed"
    assert entry.message == "Failed events"
    assert entry.data == {"resource": "events", "rows": 3}
    assert json.loads(out.getvalue())["event"] == "resource_failed"


def test_events_without_run_id_reach_stdout_only() -> None:
    """Events not bound to a run are rendered but never stored."""
    append = FakeAppend()
    writer = EntryWriter(append)
    _, out = configured(writer)
    runlog.get_logger(worker_id="w").info("lease_not_acquired")
    writer.flush()
    assert append.batches == []
    assert "lease_not_acquired" in out.getvalue()


def test_hold_diverts_entries_for_a_transaction() -> None:
    """Entries logged under hold() are collected, not buffered."""
    append = FakeAppend()
    writer = EntryWriter(append)
    sink, _ = configured(writer)
    log = runlog.get_logger(run_id="r")
    with sink.hold() as held:
        log.info("run_completed")
    assert [e.event for e in held] == ["run_completed"]
    assert writer.pending() == 0


def test_long_messages_are_truncated_with_a_marker() -> None:
    """A message over the limit is cut and marked."""
    append = FakeAppend()
    writer = EntryWriter(append)
    configured(writer)
    runlog.get_logger(run_id="r").info("e", message="x" * 10_000)
    writer.flush()
    message = append.batches[0][0].message
    assert message.endswith(runlog.TRUNCATION_MARKER)
    assert len(message.encode()) <= 300


def test_secrets_are_scrubbed_before_store_and_stdout() -> None:
    """A secret in the message or data reaches neither the entry nor stdout."""
    append = FakeAppend()
    writer = EntryWriter(append)
    _, out = configured(writer)
    runlog.get_logger(run_id="r").error(
        "run_failed",
        message="connect postgresql://u:pw-canary-1@h/db failed",
        password="pw-canary-2",
    )
    writer.flush()
    entry = append.batches[0][0]
    assert "pw-canary" not in entry.message
    assert "pw-canary" not in str(entry.data)
    assert "pw-canary" not in out.getvalue()


def test_background_flush_batches_within_the_interval() -> None:
    """The writer thread stores buffered entries without an explicit flush, in batches."""
    append = FakeAppend()
    writer = EntryWriter(append, flush_ms=20, batch_size=10_000)
    configured(writer)
    writer.start()
    log = runlog.get_logger(run_id="r")
    for i in range(500):
        log.info("e", n=i)
    writer.close()
    stored = [e for batch in append.batches for e in batch]
    assert [e.data["n"] for e in stored] == list(range(500))
    assert len(append.batches) < 500


def test_failed_flush_keeps_entries_in_order() -> None:
    """A flush that fails puts its batch back; the next flush stores everything in order."""
    append = FakeAppend(fail_times=1)
    writer = EntryWriter(append)
    configured(writer)
    log = runlog.get_logger(run_id="r")
    log.info("a")
    with contextlib.suppress(ConnectionError):
        writer.flush()
    log.info("b")
    writer.flush()
    assert [e.event for e in append.batches[0]] == ["a", "b"]


def test_capture_logs_sees_events() -> None:
    """structlog's capture_logs works on our loggers (how event tests inspect events)."""
    with capture_logs() as logs:
        runlog.get_logger(run_id="r").info("slice_started", resource="events", slice=1)
    assert logs == [
        {
            "event": "slice_started",
            "resource": "events",
            "slice": 1,
            "run_id": "r",
            "log_level": "info",
        }
    ]


def test_console_rendering_matches_the_docs_and_escapes() -> None:
    """Console lines read ``HH:MM:SS [level] event - message`` with control chars escaped."""
    line = runlog.render_console(
        None, "info", {"event": "resource_started", "message": "Extracting\nprofiles"}
    )
    assert line[8:] == " [info] resource_started - Extracting\\nprofiles"


def test_json_lines_carry_level_and_utc_time_as_structlog_writes_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The JSON format's ``level`` and ``timestamp``: structlog's names, ISO 8601 UTC with a
    ``Z``; the once-a-second text is made again when the second changes."""
    _, out = configured(None)
    clock = iter([1_764_313_199_999_999_500, 1_764_313_200_000_000_000, 1_764_313_200_000_042_999])
    monkeypatch.setattr(runlog.time, "time_ns", lambda: next(clock))
    log = runlog.get_logger()
    log.warn("first")
    log.exception("second")
    log.info("third")
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(line["level"], line["timestamp"]) for line in lines] == [
        ("warning", "2025-11-28T06:59:59.999999Z"),
        ("error", "2025-11-28T07:00:00.000000Z"),
        ("info", "2025-11-28T07:00:00.000042Z"),
    ]
    for line in lines:
        assert datetime.fromisoformat(line["timestamp"]).utcoffset() == timedelta(0)


def test_console_lines_carry_the_utc_time_of_day_of_each_second(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The console clock is the call's own second, however the once-a-second text is kept."""
    clock = iter([1_764_313_199_999_999_999, 1_764_313_200_000_000_000, 1_764_313_261_500_000_000])
    monkeypatch.setattr(runlog.time, "time_ns", lambda: next(clock))
    lines = [runlog.render_console(None, "info", {"event": "e"}) for _ in range(3)]
    assert [line[:8] for line in lines] == ["06:59:59", "07:00:00", "07:01:01"]
