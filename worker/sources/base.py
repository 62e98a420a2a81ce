"""The source contract: list resources, then yield pages of rows for one slice."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Protocol

from worker.pipelines import ResourceConfig, Window

#: One row of extracted data.
Row = dict[str, Any]


class Source(Protocol):
    """Where rows come from.

    ``read`` yields pages; the runner checks for SIGTERM, cancellation and a
    lost lease between pages, so a page is the unit of prompt stopping: keep
    pages small enough to fetch in a second or two.
    """

    def read(self, resource: ResourceConfig, window: Window | None) -> Iterator[list[Row]]:
        """Yield pages of ``resource`` rows within ``window`` (the whole resource when None)."""
        ...

    def close(self) -> None:
        """Release connections and sessions."""
        ...


class SourceFactory(Protocol):
    """Builds a source from its pipeline config merged with the run's params."""

    def __call__(self, options: Mapping[str, Any]) -> Source:
        """A ready source; raises ConfigError on bad options."""
        ...
