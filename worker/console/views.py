"""What the console's templates show, built from runs and entries: formatted cells, the
checkpoint in words, the attempt history. Pure functions; no request, no store."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from worker import telemetry
from worker.models import TERMINAL, Entry, Event, Run, Status
from worker.runlog import escape_controls
from worker.wording import format_count, run_duration

#: What a cell shows for a value that is not there.
NONE = "\u2013"
#: How long a text cell may get before the page shortens it (the full text stays in its title).
MAX_CELL = 200

_ENDINGS = {
    Event.RUN_INTERRUPTED.value: "interrupted",
    Event.WATCHDOG_RECOVERY.value: "recovered by the watchdog",
    Event.WATCHDOG_FAST_RECOVERY.value: "re-queued after its stop",
    Event.RUN_RETRY.value: "failed; retrying",
    Event.RUN_COMPLETED.value: "completed",
    Event.RUN_FAILED.value: "failed",
    Event.RUN_CANCELLED.value: "cancelled",
    Event.WATCHDOG_CANCELLED.value: "cancelled by the watchdog",
}


def inert(value: Any, limit: int | None = None) -> str:
    """Text from the store as inert text: control characters, ANSI escapes and line
    separators shown as escapes; Jinja's autoescape then makes the markup inert."""
    text = escape_controls(str(value))
    if limit is not None and len(text) > limit:
        return text[: limit - 1] + "…"
    return text


def format_bytes(value: int) -> str:
    """``1536`` → ``1.5 KiB``."""
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{value} B"  # pragma: no cover - the loop always returns


def when(moment: datetime | None) -> str:
    """A stored time, in UTC, to the second."""
    return NONE if moment is None else moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def checkpoint_words(run: Run) -> str:
    """Where the run's checkpoint stands: ``events: slice 37/104``, ``events: done``."""
    position = run.checkpoint.get("position") or {}
    resource = position.get("resource")
    if not isinstance(resource, str):
        return "not started" if run.status is not Status.SUCCEEDED else "done"
    piece = position.get("slice")
    total = position.get("slices")
    if isinstance(piece, int) and isinstance(total, int):
        return f"{inert(resource)}: slice {piece}/{total}"
    if isinstance(piece, int):
        return f"{inert(resource)}: slice {piece}"
    return f"{inert(resource)}: done"


@dataclass(frozen=True, slots=True)
class RunRow:
    """One line of the runs table."""

    id: str
    pipeline: str
    status: str
    attempt: int
    progress: float
    rows: str
    bytes: str
    started: str
    duration: str
    worker: str
    gateway: str
    error: str
    terminal: bool


def run_row(run: Run, now: datetime) -> RunRow:
    """A run as the runs table shows it."""
    summary = run.telemetry_summary
    return RunRow(
        id=run.id,
        pipeline=inert(run.pipeline, MAX_CELL),
        status=run.status.value,
        attempt=run.attempt,
        progress=telemetry.progress(summary),
        rows=format_count(telemetry.counter(summary, "rows_loaded")),
        bytes=format_bytes(telemetry.counter(summary, "bytes_loaded")),
        started=when(run.started_at),
        duration=run_duration(run, now, NONE),
        worker=inert(run.lease_owner or NONE, MAX_CELL),
        gateway=inert(run.gateway or NONE, MAX_CELL),
        error=inert(run.error_summary or "", MAX_CELL),
        terminal=run.status in TERMINAL,
    )


@dataclass(frozen=True, slots=True)
class AttemptRow:
    """One lease of a run: who held it and how it ended."""

    number: int | None
    worker: str
    epoch: Any
    started: str
    ended: str
    ended_at: str


def attempts(history: list[Entry]) -> list[AttemptRow]:
    """The attempt history from a run's lifecycle entries (``Store.attempt_history``)."""
    rows: list[AttemptRow] = []
    current: Entry | None = None

    def close(ending: str, at: str) -> None:
        nonlocal current
        if current is not None:
            rows.append(
                AttemptRow(
                    number=current.attempt,
                    worker=inert(current.worker_id or NONE, MAX_CELL),
                    epoch=current.data.get("lease_epoch", NONE),
                    started=when(current.occurred_at),
                    ended=ending,
                    ended_at=at,
                )
            )
        current = None

    for entry in history:
        if entry.event == Event.LEASE_ACQUIRED.value:
            close("lease lost (no ending logged)", NONE)
            current = entry
        elif entry.event in _ENDINGS:
            close(_ENDINGS[entry.event], when(entry.occurred_at))
    if current is not None:
        close("running", NONE)
    return rows
