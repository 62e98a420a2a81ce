"""The null destination: counts rows and keeps none. For dry runs and for timing a source."""

from __future__ import annotations

from typing import Any

from worker.destinations.base import Publish, RunScope, SliceKey, SliceStats
from worker.runlog import Logger
from worker.sources.base import Page


class NullSlice:
    """A slice that only counts."""

    def __init__(self) -> None:
        self.rows = 0

    def write(self, rows: Page) -> None:
        """Count the rows."""
        self.rows += len(rows)

    def seal(self) -> SliceStats:
        """Report the count; nothing is stored."""
        return SliceStats(rows=self.rows, files=0, bytes=0)

    def publish(self) -> None:
        """Nothing to publish."""

    def discard(self) -> None:
        """Nothing to discard."""


class NullDestination:
    """Discards every row."""

    def stage(self, key: SliceKey, log: Logger) -> NullSlice:
        """A counting slice."""
        return NullSlice()

    def describe(self) -> dict[str, Any]:
        """Kind only."""
        return {"type": "null"}

    def prepare_finish(self, scope: RunScope, log: Logger) -> Publish | None:
        """Nothing kept, nothing to publish."""
        return None

    def abort(self, scope: RunScope, log: Logger) -> None:
        """Nothing kept, nothing to remove."""

    def close(self) -> None:
        """Nothing held."""
