"""The destination contract: write one slice atomically, report what was written."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from worker.pipelines import ResourceConfig, WriteMode
from worker.runlog import Logger
from worker.sources.base import Page


@dataclass(frozen=True, slots=True)
class WriteSpec:
    """How a resource's rows land: its pipeline ``write_mode`` and what the mode needs."""

    mode: WriteMode = WriteMode.APPEND
    primary_key: tuple[str, ...] = ()
    hard_delete: str | None = None
    #: ``append`` only: ``remove`` takes a failed or cancelled run's rows out again.
    on_failure: str = "keep"

    @classmethod
    def of(cls, resource: ResourceConfig) -> WriteSpec:
        """The spec a pipeline's resource declares."""
        return cls(
            resource.write_mode,
            tuple(resource.primary_key),
            resource.hard_delete,
            resource.on_failure,
        )


@dataclass(frozen=True, slots=True)
class RunScope:
    """One run as a destination sees it at the run's end: every resource's write spec."""

    pipeline: str
    run_id: str
    #: The ending holder's lease epoch.
    epoch: int
    resources: Mapping[str, WriteSpec] = field(default_factory=dict)


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
    #: The resource's write mode.
    write: WriteSpec = WriteSpec()


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


#: What publishes a run's result inside its final fenced transaction.
Publish = Callable[[], None]


class Destination(Protocol):
    """Where rows go.

    Besides slices, a destination sees the end of a run: ``prepare_finish`` before
    a run succeeds (``replace`` and ``merge`` build the run's result there) and
    ``abort`` after a run ended failed or cancelled (what the write modes promise
    a failed run leaves behind). See docs/pipelines.md, "Write modes".
    """

    def stage(self, key: SliceKey, log: Logger) -> StagedSlice:
        """Begin writing one slice; ``log`` is the run's logger (for schema changes)."""
        ...

    def describe(self) -> dict[str, Any]:
        """Non-secret facts for the run log (kind, location)."""
        ...

    def prepare_finish(self, scope: RunScope, log: Logger) -> Publish | None:
        """Slow work before the run's last commit; returns the quick, atomic and idempotent
        step that publishes the result inside that commit (None: nothing to publish)."""
        ...

    def abort(self, scope: RunScope, log: Logger) -> None:
        """The run ended failed or cancelled: remove what its write modes must not leave."""
        ...

    def close(self) -> None:
        """Release connections; called once when the attempt ends."""
        ...
