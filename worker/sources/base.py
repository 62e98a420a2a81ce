"""The source contract: yield pages of rows for one resource and slice window.

A source is one class with ``read`` and ``close`` and a factory that builds it
from the pipeline's ``[source]`` table (secret references already resolved)
merged with the run's params. See "Writing a source" in docs/pipelines.md.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import Any, Protocol, overload

from worker.errors import SourceError
from worker.pipelines import ResourceConfig, Window
from worker.runlog import Logger

#: One row of extracted data: column name to a JSON-able or SQL-typed value
#: (str, int, float, bool, None, Decimal, date, datetime, bytes, list, dict).
Row = dict[str, Any]


class RowPage(Sequence[Row]):
    """A page of rows held as one column list and tuples: dicts are made only when asked.

    Sources that read tuples (the SQL source) yield these; destinations that can
    take columns and tuples directly (Parquet, the sql destination) skip building
    a dict per row, which is most of the per-row cost of a copy. Everything else
    sees an ordinary sequence of dicts.
    """

    __slots__ = ("columns", "tuples")

    def __init__(self, columns: Sequence[str], tuples: Sequence[Sequence[Any]]) -> None:
        self.columns = list(columns)
        self.tuples = tuples

    def __len__(self) -> int:
        return len(self.tuples)

    @overload
    def __getitem__(self, index: int) -> Row: ...
    @overload
    def __getitem__(self, index: slice) -> list[Row]: ...
    def __getitem__(self, index: int | slice) -> Row | list[Row]:
        if isinstance(index, slice):
            return [dict(zip(self.columns, t, strict=True)) for t in self.tuples[index]]
        return dict(zip(self.columns, self.tuples[index], strict=True))

    def __iter__(self) -> Iterator[Row]:
        columns = self.columns
        return (dict(zip(columns, t, strict=True)) for t in self.tuples)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)

    __hash__ = None  # type: ignore[assignment]  # mutable-looking, like a list


#: What a source yields and a destination takes: a list of dicts or a RowPage.
Page = Sequence[Row]


@dataclass
class ReadContext:
    """What the runner hands a source for one slice, and what it learns back.

    ``log`` is the run's logger: a source's warnings (a retry, a skipped page)
    go to the run log with the run's context. ``since`` is the high-water mark
    the last successful run of this pipeline reached for the resource
    (incremental mode; ``None`` on a first run). A source that reads
    incrementally sets ``high_water`` to the highest cursor value it has
    yielded; the runner checkpoints it with the slice. A source waits with
    ``pause``, never ``time.sleep``.
    """

    log: Logger
    since: Any = None
    high_water: Any = None
    #: Sleep for a backoff: returns early by raising when the run must stop
    #: (SIGTERM, cancel, lost lease), so a long ``Retry-After`` never delays a deploy.
    pause: Callable[[float], None] = time.sleep

    def observe(self, value: Any) -> None:
        """Raise ``high_water`` to ``value`` if it is higher (``None`` is ignored)."""
        if value is not None and (self.high_water is None or value > self.high_water):
            self.high_water = value


class Source(Protocol):
    """Where rows come from.

    ``read`` yields pages; the runner checks for SIGTERM, cancellation and a
    lost lease between pages, so a page is the unit of prompt stopping: keep
    pages small enough to fetch in a second or two. A slice must be
    repeatable: reading the same resource and window again yields the same
    rows (a redone slice replaces its first attempt).
    """

    def read(
        self, resource: ResourceConfig, window: Window | None, context: ReadContext
    ) -> Iterator[Page]:
        """Yield pages of ``resource`` rows within ``window`` (the whole resource when None)."""
        ...

    def close(self) -> None:
        """Release connections and sessions."""
        ...


def encode_mark(value: Any) -> Any:
    """A high-water mark as JSON for the checkpoint; :func:`decode_mark` reverses it."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, datetime):
        return {"type": "datetime", "value": value.isoformat()}
    if isinstance(value, date):
        return {"type": "date", "value": value.isoformat()}
    if isinstance(value, Decimal):
        return {"type": "decimal", "value": str(value)}
    msg = f"cannot keep a high-water mark of type {type(value).__name__}"
    raise SourceError(msg)


def decode_mark(value: Any) -> Any:
    """The value :func:`encode_mark` stored."""
    if isinstance(value, dict):
        kind, text = value.get("type"), str(value.get("value"))
        if kind == "datetime":
            return datetime.fromisoformat(text)
        if kind == "date":
            return date.fromisoformat(text)
        if kind == "decimal":
            return Decimal(text)
    return value
