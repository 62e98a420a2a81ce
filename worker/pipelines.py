"""Pipelines, declared in a TOML or YAML file and validated on load.

A pipeline names a source (and its config), the resources to extract (each
optionally sliced into time windows) and a destination. Errors name the file,
the pipeline and the field.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

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

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$"
_Options = TypeVar("_Options", bound=BaseModel)


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
    ``1h``) or integer windows (``start``/``end``/``step`` integers, for an id or
    sequence column).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    start: int | datetime
    end: int | datetime
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
    def _utc(cls, value: int | datetime) -> int | datetime:
        if isinstance(value, datetime) and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value

    @model_validator(mode="after")
    def _ordered(self) -> SliceSpec:
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


def plan_slices(spec: SliceSpec) -> list[Window]:
    """Every window of ``spec``, in order; the last one ends at ``spec.end``."""
    bounds: list[tuple[Any, Any]] = []
    cursor: Any = spec.start
    while cursor < spec.end:
        upper = min(cursor + spec.step, spec.end)
        bounds.append((cursor, upper))
        cursor = upper
    return [Window(i, len(bounds), lo, hi) for i, (lo, hi) in enumerate(bounds, start=1)]


class ResourceConfig(BaseModel):
    """One resource of a pipeline."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=_NAME)
    slices: SliceSpec | None = None
    options: dict[str, Any] = Field(default_factory=dict)


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

    @model_validator(mode="after")
    def _unique_resources(self) -> Pipeline:
        names = [r.name for r in self.resources]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            msg = f"duplicate resource names: {', '.join(duplicates)}"
            raise ValueError(msg)
        return self


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


def load_pipelines(path: Path) -> dict[str, Pipeline]:
    """Every pipeline in the file, validated; raises :class:`ConfigError` naming the field."""
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
