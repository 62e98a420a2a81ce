"""Live telemetry of a run: a thread-safe rollup the runner updates and the heartbeat stores."""

from __future__ import annotations

import threading
from typing import Any


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
            "progress": 0.0,
            "current_phase": "starting",
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
