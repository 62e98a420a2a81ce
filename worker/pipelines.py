"""Pipelines, declared in a TOML or YAML file and validated on load.

A pipeline names a source (and its config), the resources to extract (each
optionally sliced into time windows) and a destination. Errors name the file,
the pipeline and the field.
"""

from __future__ import annotations

import enum
import functools
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from worker.errors import ConfigError, InvalidInput, UnknownPipeline
from worker.limits import check_json
from worker.schedules import Schedule, check_timezone

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$"
_Options = TypeVar("_Options", bound=BaseModel)
#: Longest duration a pipeline setting accepts.
MAX_DURATION = timedelta(days=30)


def parse_duration(value: str | int | float | timedelta) -> timedelta:
    """Read ``90s``, ``15m``, ``1h``, ``1d``, ``1w`` or a number of seconds."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, int | float):
        return timedelta(seconds=value)
    match = _DURATION.match(value)
    if match is None:
        msg = f"invalid duration {value!r}: use a number and a unit, like 15m, 1h or 1d"
        raise ValueError(msg)
    return timedelta(seconds=float(match.group(1)) * _UNIT_SECONDS[match.group(2)])


class SliceSpec(BaseModel):
    """Windows a resource is extracted in: ``[start, end)`` in steps.

    Either time windows (``start``/``end`` datetimes, ``step`` a duration such as
    ``1h``), integer windows (``start``/``end``/``step`` integers, for an id or
    sequence column), or ``window = "interval"``: the run's own data interval
    (scheduled pipelines), in ``step``-long windows.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    window: Literal["interval"] | None = None
    start: int | datetime | None = None
    end: int | datetime | None = None
    step: int | timedelta

    @field_validator("step", mode="before")
    @classmethod
    def _step(cls, value: Any, info: ValidationInfo) -> Any:
        start = info.data.get("start")
        if isinstance(start, int) or isinstance(value, timedelta):
            return value  # integer windows take an integer step
        return parse_duration(value)

    @field_validator("start", "end")
    @classmethod
    def _utc(cls, value: int | datetime | None) -> int | datetime | None:
        if isinstance(value, datetime) and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value

    @model_validator(mode="after")
    def _ordered(self) -> SliceSpec:
        if self.window == "interval":
            if self.start is not None or self.end is not None:
                msg = 'window = "interval" takes its bounds from the run: drop start and end'
                raise ValueError(msg)
            if not isinstance(self.step, timedelta) or self.step <= timedelta(0):
                msg = 'window = "interval" needs a positive duration step, like "1h"'
                raise ValueError(msg)
            return self
        if self.start is None or self.end is None:
            msg = 'start and end are required (or window = "interval")'
            raise ValueError(msg)
        integer = [isinstance(v, int) for v in (self.start, self.end, self.step)]
        if any(integer) and not all(integer):
            msg = "start, end and step must all be integers, or datetimes and a duration"
            raise ValueError(msg)
        if self.end <= self.start:  # type: ignore[operator]  # same kind, checked above
            msg = "end must be after start"
            raise ValueError(msg)
        if (self.step <= 0) if isinstance(self.step, int) else (self.step <= timedelta(0)):
            msg = "step must be positive"
            raise ValueError(msg)
        return self


#: A window bound: a UTC datetime for time slices, an integer for id slices.
Bound = int | datetime


def format_bound(value: Bound) -> str | int:
    """A bound as it appears in log entries: ISO 8601 or the integer itself."""
    return value.isoformat() if isinstance(value, datetime) else value


@dataclass(frozen=True, slots=True)
class Window:
    """One slice of a resource: 1-based ``index`` of ``total``, covering ``[start, end)``."""

    index: int
    total: int
    start: Bound
    end: Bound


def plan_slices(spec: SliceSpec, interval: tuple[datetime, datetime] | None = None) -> list[Window]:
    """Every window of ``spec``, in order; the last one ends at the spec's (or the
    ``interval``'s, for ``window = "interval"``) end."""
    start: Any = spec.start
    end: Any = spec.end
    if spec.window == "interval":
        if interval is None:
            msg = 'slices.window = "interval": this run has no data interval'
            raise ConfigError(msg)
        start, end = interval
    bounds: list[tuple[Any, Any]] = []
    cursor: Any = start
    while cursor < end:
        upper = min(cursor + spec.step, end)
        bounds.append((cursor, upper))
        cursor = upper
    return [Window(i, len(bounds), lo, hi) for i, (lo, hi) in enumerate(bounds, start=1)]


class WriteMode(enum.StrEnum):
    """How a resource's rows land in the destination (see docs/pipelines.md, "Write modes").

    - ``append``: every run adds its rows; a redone slice replaces its own rows.
    - ``replace``: the run's rows replace the table (or file set) at once when it succeeds.
    - ``merge``: rows are upserted on ``primary_key``; a later run's row updates, never
      duplicates.
    """

    APPEND = "append"
    REPLACE = "replace"
    MERGE = "merge"


class ResourceConfig(BaseModel):
    """One resource of a pipeline."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=_NAME)
    slices: SliceSpec | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    write_mode: WriteMode = WriteMode.APPEND
    #: The key ``merge`` upserts on: one column or several.
    primary_key: list[str] = Field(default_factory=list, max_length=32)
    #: ``merge`` only: a boolean column whose true value deletes the key's row.
    hard_delete: str | None = None
    #: What a run that ends failed or cancelled leaves of an ``append``: its committed
    #: slices (``keep``) or nothing (``remove``). ``replace`` always leaves nothing.
    on_failure: Literal["keep", "remove"] = "keep"

    @field_validator("primary_key", mode="before")
    @classmethod
    def _key_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _write_fields(self) -> ResourceConfig:
        if self.write_mode is WriteMode.MERGE and not self.primary_key:
            raise ValueError('write_mode = "merge" needs a primary_key (a column or a list)')
        if self.write_mode is not WriteMode.MERGE and (self.primary_key or self.hard_delete):
            field = "primary_key" if self.primary_key else "hard_delete"
            raise ValueError(f'{field} applies to write_mode = "merge" only')
        if self.on_failure == "remove" and self.write_mode is not WriteMode.APPEND:
            raise ValueError('on_failure applies to write_mode = "append" only')
        return self


class PluginConfig(BaseModel):
    """A source or destination: its ``type`` and the settings that type reads."""

    model_config = ConfigDict(extra="allow", frozen=True)

    type: str = Field(pattern=r"^[a-z][a-z0-9_]*$")

    def options(self) -> dict[str, Any]:
        """Everything but ``type``."""
        return dict(self.model_extra or {})


class Pipeline(BaseModel):
    """A named extraction: source, resources, destination."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=_NAME)
    description: str = ""
    source: PluginConfig
    resources: list[ResourceConfig] = Field(min_length=1)
    destination: PluginConfig = PluginConfig(type="files")
    #: Cron expression (5 fields, 6 with seconds first, or ``@hourly``-style); None: manual only.
    schedule: str | None = None
    #: The IANA zone ``schedule`` is read in.
    timezone: str = "UTC"
    #: After beat was down: one run per missed interval (True) or one for the latest (False).
    catchup: bool = False
    #: Most missed intervals caught up at once (the newest ones).
    max_catchup: int = Field(default=100, ge=1, le=10_000)
    #: Runs of this pipeline that may have started and not ended at once.
    max_active_runs: int = Field(default=1, ge=1, le=1000)
    #: Times a run failing on a transient error is tried again, from its checkpoint.
    retries: int = Field(default=0, ge=0, le=100)
    #: First retry's delay; each next one doubles, with jitter, up to ``retry_max_delay``.
    retry_delay: timedelta = timedelta(seconds=30)
    retry_max_delay: timedelta = timedelta(hours=1)
    #: Longest one attempt may run before it fails.
    run_timeout: timedelta = timedelta(hours=24)
    #: Longest a source may take to produce one page before the slice fails.
    page_timeout: timedelta = timedelta(minutes=10)

    @field_validator("retry_delay", "retry_max_delay", "run_timeout", "page_timeout", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> timedelta:
        duration = parse_duration(value)
        if duration <= timedelta(0) or duration > MAX_DURATION:
            msg = f"must be positive and at most {MAX_DURATION.days} days"
            raise ValueError(msg)
        return duration

    @field_validator("schedule")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        if value is not None:
            Schedule(value)  # the expression alone; the zone is checked as its own field
        return value

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        check_timezone(value)
        return value

    @model_validator(mode="after")
    def _unique_resources(self) -> Pipeline:
        names = [r.name for r in self.resources]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            msg = f"duplicate resource names: {', '.join(duplicates)}"
            raise ValueError(msg)
        if self.schedule is None:
            for resource in self.resources:
                if resource.slices is not None and resource.slices.window == "interval":
                    msg = (
                        f'resources.{resource.name}.slices.window: "interval" needs '
                        "the pipeline's schedule (a data interval comes from one)"
                    )
                    raise ValueError(msg)
        return self

    @functools.cached_property
    def cron(self) -> Schedule | None:
        """The schedule, parsed; None for a pipeline that only runs when triggered."""
        return None if self.schedule is None else Schedule(self.schedule, self.timezone)


def option_errors(prefix: str, error: ValidationError) -> str:
    """A plugin's option errors, each naming its field: ``source.page_size: …; …``."""
    return "; ".join(
        f"{prefix}.{'.'.join(str(p) for p in item['loc']) or '(options)'}: {item['msg']}"
        for item in error.errors()
    )


def parse_options(model: type[_Options], options: Mapping[str, Any], prefix: str) -> _Options:
    """``options`` validated as ``model``, or a :class:`ConfigError` naming each bad field."""
    try:
        return model.model_validate(dict(options))
    except ValidationError as exc:
        raise ConfigError(option_errors(prefix, exc)) from None


def _format_error(path: Path, pipeline: str, error: ValidationError) -> str:
    problems = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "(pipeline)"
        problems.append(f"{field}: {item['msg']}")
    return f"{path}: pipeline {pipeline!r}: " + "; ".join(problems)


def _read(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        msg = f"{path}: pipelines file not found (set QUARRY_PIPELINES_FILE)"
        raise ConfigError(msg) from None
    except OSError as exc:
        msg = f"{path}: cannot read pipelines file: {exc.strerror}"
        raise ConfigError(msg) from None
    try:
        if path.suffix in {".yaml", ".yml"}:
            document = yaml.safe_load(text) or {}
        else:
            document = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        msg = f"{path}: not valid {'YAML' if path.suffix in {'.yaml', '.yml'} else 'TOML'}: {exc}"
        raise ConfigError(msg) from None
    if not isinstance(document, dict):
        msg = f"{path}: expected a table of pipelines at the top level"
        raise ConfigError(msg)
    return document


#: The last file read, by path: (mtime_ns, size, pipelines). Pipelines are immutable.
_LOADED: dict[Path, tuple[int, int, dict[str, Pipeline]]] = {}


def load_pipelines(path: Path) -> dict[str, Pipeline]:
    """Every pipeline in the file, validated; raises :class:`ConfigError` naming the field.

    The parsed file is reused while its modification time and size are unchanged: the
    schedule tick and every run read it, and a thousand pipelines take a while to parse.
    """
    try:
        stat = path.stat()
    except OSError:
        stat = None
    cached = _LOADED.get(path)
    if stat is not None and cached is not None and cached[:2] == (stat.st_mtime_ns, stat.st_size):
        return dict(cached[2])
    pipelines = _load(path)
    if stat is not None:
        _LOADED[path] = (stat.st_mtime_ns, stat.st_size, pipelines)
    return dict(pipelines)


def _load(path: Path) -> dict[str, Pipeline]:
    document = _read(path)
    declared = document.get("pipelines")
    if not isinstance(declared, dict) or not declared:
        msg = f"{path}: no [pipelines.NAME] tables found"
        raise ConfigError(msg)
    pipelines: dict[str, Pipeline] = {}
    for name, body in declared.items():
        if not isinstance(body, dict):
            msg = f"{path}: pipeline {name!r}: expected a table"
            raise ConfigError(msg)
        try:
            check_json(body, f"pipeline {name!r}", json_types=False)
        except InvalidInput as exc:
            raise ConfigError(f"{path}: {exc}") from None
        try:
            pipelines[name] = Pipeline.model_validate({"name": name, **body})
        except ValidationError as exc:
            raise ConfigError(_format_error(path, name, exc)) from None
    return pipelines


def get_pipeline(path: Path, name: str) -> Pipeline:
    """One pipeline by name; raises :class:`UnknownPipeline` listing the known ones."""
    pipelines = load_pipelines(path)
    if name not in pipelines:
        known = ", ".join(sorted(pipelines)) or "none"
        msg = f"unknown pipeline {name!r} in {path} (known: {known})"
        raise UnknownPipeline(msg)
    return pipelines[name]
