"""The destination contract: write one slice atomically, report what was written."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from worker.runlog import Logger
from worker.sources.base import Page


@dataclass(frozen=True, slots=True)
class SliceKey:
    """Names a slice deterministically, so a redone slice replaces its first attempt."""

    pipeline: str
    run_id: str
    resource: str
    #: 1-based slice number; 0 for an unsliced resource.
    index: int
    #: The writer's lease epoch (temporary names only; never part of the final name).
    epoch: int


@dataclass(frozen=True, slots=True)
class SliceStats:
    """What a published slice holds."""

    rows: int
    files: int
    bytes: int


class StagedSlice(Protocol):
    """A slice being written: invisible until ``publish``, gone after ``discard``.

    ``publish`` runs inside the fenced checkpoint transaction, so it must be quick
    and atomic (a rename, a commit); the slow work belongs in ``seal``.
    """

    def write(self, rows: Page) -> None:
        """Add a page of rows."""
        ...

    def seal(self) -> SliceStats:
        """Finish writing and make the data durable, still invisible; report what it holds."""
        ...

    def publish(self) -> None:
        """Make the sealed slice visible at once, replacing any earlier attempt at it."""
        ...

    def discard(self) -> None:
        """Remove everything written so far."""
        ...


class Destination(Protocol):
    """Where rows go."""

    def stage(self, key: SliceKey, log: Logger) -> StagedSlice:
        """Begin writing one slice; ``log`` is the run's logger (for schema changes)."""
        ...

    def describe(self) -> dict[str, Any]:
        """Non-secret facts for the run log (kind, location)."""
        ...

    def close(self) -> None:
        """Release connections; called once when the attempt ends."""
        ...
