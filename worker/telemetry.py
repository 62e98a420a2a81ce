"""Live telemetry of a run: a thread-safe rollup the runner updates and the heartbeat stores."""

from __future__ import annotations

import enum
import math
import threading
from typing import Any

from worker.errors import InvalidInput
from worker.limits import MAX_INT


class Phase(enum.StrEnum):
    """Where the running attempt is, as the summary's ``current_phase`` reports it."""

    STARTING = "starting"
    EXTRACTING = "extracting"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"
    FAILED = "failed"
    RETRYING = "retrying"


class Telemetry:
    """Rows, bytes, files and progress of the running attempt, shallow-merged into the summary."""

    def __init__(self, units_total: int, initial: dict[str, Any] | None = None) -> None:
        self._lock = threading.Lock()
        start = initial or {}
        self.units_total = max(units_total, 1)
        self.units_done = 0
        self._summary: dict[str, Any] = {
            "rows_loaded": int(start.get("rows_loaded", 0)),
            "bytes_loaded": int(start.get("bytes_loaded", 0)),
            "files_written": int(start.get("files_written", 0)),
            # A resumed attempt starts where the last one stood, not back at 0.
            "progress": progress(start),
            "current_phase": Phase.STARTING,
            "current_resource": None,
        }

    def add(self, *, rows: int = 0, bytes_: int = 0, files: int = 0) -> None:
        """Count rows, bytes and files that were committed."""
        with self._lock:
            self._summary["rows_loaded"] += rows
            self._summary["bytes_loaded"] += bytes_
            self._summary["files_written"] += files

    def unit_done(self, count: int = 1) -> None:
        """A slice (or an unsliced resource) is committed."""
        with self._lock:
            self.units_done += count
            self._summary["progress"] = round(100.0 * self.units_done / self.units_total, 2)

    def set(self, **values: Any) -> None:
        """Set phase, resource or other rollup fields."""
        with self._lock:
            self._summary.update(values)

    def snapshot(self) -> dict[str, Any]:
        """A copy of the summary."""
        with self._lock:
            return dict(self._summary)


#: The summary's known counters, each with the camelCase spelling the runs API documents.
COUNTERS = {
    "rows_loaded": "rowsLoaded",
    "bytes_loaded": "bytesLoaded",
    "files_written": "filesWritten",
}
#: The summary's known labels and their camelCase spellings.
LABELS = {"current_phase": "currentPhase", "current_resource": "currentResource"}
#: Longest phase or resource label.
MAX_LABEL = 200


def check_summary(summary: dict[str, Any]) -> dict[str, Any]:
    """``summary`` when its known fields have their types and ranges; InvalidInput otherwise.

    Counters are whole numbers from 0 to 2^63-1, ``progress`` a number from 0 to 100,
    labels strings (or null). Other fields are free-form JSON, bounded elsewhere.
    """
    for snake, camel in COUNTERS.items():
        for name in (snake, camel):
            value = summary.get(name)
            if value is not None and (type(value) is not int or not 0 <= value <= MAX_INT):
                msg = f"telemetrySummary.{name}: expected a whole number from 0 to 2^63-1"
                raise InvalidInput(msg)
    value = summary.get("progress")
    if value is not None and (type(value) not in {int, float} or not 0 <= value <= 100):
        msg = "telemetrySummary.progress: expected a number from 0 to 100"
        raise InvalidInput(msg)
    for snake, camel in LABELS.items():
        for name in (snake, camel):
            value = summary.get(name)
            if value is not None and (type(value) is not str or len(value) > MAX_LABEL):
                msg = (
                    f"telemetrySummary.{name}: expected a string of at most {MAX_LABEL} characters"
                )
                raise InvalidInput(msg)
    return summary


def counter(summary: dict[str, Any], name: str) -> int:
    """A counter of a stored summary (either spelling), or 0 when it is missing or not a count.

    Readers never trust a stored summary: one written before validation, or by hand,
    must not break a table that shows it.
    """
    for key in (name, COUNTERS.get(name, name)):
        value = summary.get(key)
        if type(value) is int and value >= 0:
            return value
        if type(value) is float and math.isfinite(value) and value >= 0:
            return int(value)
    return 0


def progress(summary: dict[str, Any]) -> float:
    """A stored summary's progress, clamped to 0-100 (0 when missing or not a number)."""
    value = summary.get("progress")
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        return 0.0
    return min(max(float(value), 0.0), 100.0)


def label(summary: dict[str, Any], name: str) -> str | None:
    """A label of a stored summary (either spelling), or None."""
    for key in (name, LABELS.get(name, name)):
        value = summary.get(key)
        if isinstance(value, str) and value:
            return value
    return None
