"""Query parameters as pydantic models: bounded, typed, and refusing unknown names (400), so a
misspelled filter never silently returns everything. The seed's spellings are aliases."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import Query
from pydantic import AliasChoices, BaseModel, BeforeValidator, ConfigDict, Field

from worker.models import Event, Status

#: Most entries one page of logs returns.
MAX_PAGE = 1000
#: Entry ids and stream event ids: ASCII digits, as this API writes them.
ENTRY_CURSOR = r"^[0-9]{1,18}$"
#: A run id as a runs-page cursor.
RUN_CURSOR = r"^[A-Za-z0-9_\-]{1,64}$"
#: Free text in a query: no store can hold NUL, so the schema refuses it as the guard does.
NO_NUL = r"^[^\x00]*$"
#: Earliest and latest Unix milliseconds a ``from``/``to`` filter takes (years 1 to 9999).
MIN_UNIX_MS = -62_135_596_800_000
MAX_UNIX_MS = 253_402_300_799_999


def as_utc(value: int | datetime | None) -> datetime | None:
    """A ``from``/``to`` bound in UTC; one past the datetime range is clamped to its edge."""
    if value is None:
        return None
    if isinstance(value, int):
        return datetime.fromtimestamp(value / 1000, tz=UTC)
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    try:
        return value.astimezone(UTC)
    except OverflowError:
        edge = datetime.max if value.year > 1 else datetime.min
        return edge.replace(tzinfo=UTC)


def _time_bound(value: Any) -> Any:
    """Unix milliseconds (ASCII digits) stay an int; anything else must be ISO 8601."""
    if isinstance(value, str) and value.lstrip("-").isascii() and value.lstrip("-").isdigit():
        return int(value)
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
        except ValueError:
            msg = "expected Unix milliseconds or an ISO 8601 date-time"
            raise ValueError(msg) from None
    return value


#: ``from`` / ``to``: Unix milliseconds or an ISO 8601 date-time (UTC when it has no offset).
TimeBound = Annotated[
    Annotated[int, Field(ge=MIN_UNIX_MS, le=MAX_UNIX_MS)] | datetime | None,
    BeforeValidator(_time_bound),
]


def _event_name(value: str | None) -> str | None:
    """An event filter; the seed's upper-case spelling of one of ours (RUN_COMPLETED) is ours."""
    if value is not None and value.lower() in _EVENT_NAMES:
        return value.lower()
    return value


_EVENT_NAMES = frozenset(event.value for event in Event)
EventName = Annotated[
    str | None, Field(max_length=64, pattern=NO_NUL), BeforeValidator(_event_name)
]


#: A minimum level as the API takes it; ``warn`` is read as ``warning``.
LevelName = Literal["debug", "info", "warn", "warning", "error"]


class _Query(BaseModel):
    """Query parameters: unknown names are refused (400), so a misspelled filter never
    silently returns everything."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class RunsQuery(_Query):
    """``GET /api/v1/action-runs``."""

    status: Status | None = None
    pipeline: str | None = Field(default=None, max_length=200, pattern=NO_NUL)
    gateway: str | None = Field(default=None, max_length=200, pattern=NO_NUL)
    cursor: str | None = Field(default=None, pattern=RUN_CURSOR)
    limit: int = Field(default=50, ge=1, le=MAX_PAGE)


class AgentQuery(_Query):
    """``GET /api/v1/agent/runs``."""

    cursor: str | None = Field(default=None, pattern=RUN_CURSOR)
    limit: int = Field(default=100, ge=1, le=MAX_PAGE)


class RunLogQuery(_Query):
    """``GET /api/v1/action-runs/{id}/logs``; ``count``, ``fromDate`` and ``toDate`` are the
    flat view's spellings, accepted here too."""

    level: LevelName | None = Field(
        default=None, description="This level and above: warning (or warn) = warnings and errors"
    )
    event: EventName = None
    from_: TimeBound = Field(default=None, validation_alias=AliasChoices("from", "fromDate"))
    to: TimeBound = Field(default=None, validation_alias=AliasChoices("to", "toDate"))
    cursor: str | None = Field(default=None, pattern=ENTRY_CURSOR)
    before: str | None = Field(
        default=None,
        pattern=ENTRY_CURSOR,
        description=(
            "Read backwards: the newest entries with a smaller id, still oldest first; "
            "`cursor` is then the page's oldest id while older entries remain (the next "
            "`before`). `before=999999999999999999` reads a run's tail; with `cursor` "
            "as well, the newest entries between the two."
        ),
    )
    limit: int = Field(
        default=MAX_PAGE, ge=1, le=MAX_PAGE, validation_alias=AliasChoices("limit", "count")
    )


class StreamQuery(_Query):
    """``GET /api/v1/action-runs/{id}/logs/stream``."""

    after: str | None = Field(
        default=None,
        pattern=ENTRY_CURSOR,
        description=(
            "Start after this entry id (a page's newest), so a viewer that read the tail "
            "streams only what follows; `Last-Event-ID`, sent on a reconnect, wins."
        ),
    )


class FlatLogQuery(_Query):
    """``GET /api/v1/logs``, with the seed's spellings as aliases (``workflowRunId``,
    ``state``, ``fromDate``, ``toDate``) and ``limit`` for ``count``."""

    run_id: str | None = Field(
        default=None,
        max_length=64,
        pattern=NO_NUL,
        validation_alias=AliasChoices("run_id", "runId", "workflowRunId"),
    )
    pipeline: str | None = Field(default=None, max_length=200, pattern=NO_NUL)
    event: EventName = Field(default=None, validation_alias=AliasChoices("event", "state"))
    worker_id: str | None = Field(
        default=None,
        max_length=200,
        pattern=NO_NUL,
        validation_alias=AliasChoices("worker_id", "workerId"),
    )
    from_: TimeBound = Field(default=None, validation_alias=AliasChoices("from", "fromDate"))
    to: TimeBound = Field(default=None, validation_alias=AliasChoices("to", "toDate"))
    count: int = Field(
        default=MAX_PAGE, ge=1, le=MAX_PAGE, validation_alias=AliasChoices("count", "limit")
    )
    cursor: str | None = Field(default=None, pattern=ENTRY_CURSOR)


def entry_cursor(value: str | None) -> int:
    """An entry cursor this API returned (validated ASCII digits), or 0 for the start."""
    return int(value) if value else 0


class NoQuery(_Query):
    """A route that takes no query parameters refuses any (400)."""


class CancelQuery(_Query):
    """``POST …/cancel``: ``force=true`` ends a running run now (see ``quarry runs cancel``)."""

    force: bool = False


NoQueryDep = Annotated[NoQuery, Query()]
