"""Pipelines load, validate and slice as documented."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker.errors import ConfigError, UnknownPipeline
from worker.pipelines import SliceSpec, get_pipeline, load_pipelines, parse_duration, plan_slices

GOOD = """
[pipelines.demo]
source = { type = "demo", profiles = 10 }
resources = [
  { name = "profiles" },
  { name = "events", slices = { start = "2026-01-01T00:00:00Z", end = "2026-01-02T00:00:00Z", step = "1h" } },
]
"""


def write(tmp_path: Path, text: str, name: str = "pipelines.toml") -> Path:
    """Write a pipelines file and return its path."""
    path = tmp_path / name
    path.write_text(text)
    return path


def test_valid_file_loads(tmp_path: Path) -> None:
    """A valid file yields typed pipelines with their slices."""
    pipeline = load_pipelines(write(tmp_path, GOOD))["demo"]
    assert pipeline.source.type == "demo"
    assert pipeline.source.options() == {"profiles": 10}
    assert pipeline.destination.type == "files"
    spec = pipeline.resources[1].slices
    assert spec is not None
    assert len(plan_slices(spec)) == 24


def test_yaml_is_accepted(tmp_path: Path) -> None:
    """The same pipeline declared in YAML loads the same."""
    yaml_text = """
pipelines:
  demo:
    source: {type: demo}
    resources:
      - name: lists
"""
    assert load_pipelines(write(tmp_path, yaml_text, "p.yaml"))["demo"].resources[0].name == "lists"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[pipelines.demo]\nresources = [{name='a'}]\n", "pipeline 'demo': source: Field required"),
        (
            "[pipelines.demo]\nsource={type='demo'}\nresources=[{name='e', slices={start='2026-01-02T00:00:00Z', end='2026-01-01T00:00:00Z', step='1h'}}]\n",
            "pipeline 'demo': resources.0.slices: Value error, end must be after start",
        ),
        (
            "[pipelines.demo]\nsource={type='demo'}\nresources=[{name='e', slices={start='2026-01-01T00:00:00Z', end='2026-01-02T00:00:00Z', step='soon'}}]\n",
            "resources.0.slices.step",
        ),
        (
            "[pipelines.demo]\nsource={type='demo'}\nresources=[]\n",
            "resources: List should have at least 1 item",
        ),
        (
            "[pipelines.demo]\nsource={type='demo'}\nresources=[{name='a'},{name='a'}]\n",
            "duplicate resource names: a",
        ),
        (
            "[pipelines.demo]\nsource={type='demo'}\nresources=[{name='a', typo=1}]\n",
            "resources.0.typo: Extra inputs",
        ),
        ("[pipelines.demo\n", "not valid TOML"),
        ("[other]\n", "no [pipelines.NAME] tables"),
    ],
)
def test_errors_name_file_pipeline_and_field(tmp_path: Path, text: str, needle: str) -> None:
    """A malformed file raises ConfigError naming the file, the pipeline and the field."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_pipelines(path)
    assert str(path) in str(info.value)
    assert needle in str(info.value)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    """A missing file says which file and how to point elsewhere."""
    with pytest.raises(ConfigError, match="QUARRY_PIPELINES_FILE"):
        load_pipelines(tmp_path / "nope.toml")


def test_unknown_pipeline_lists_known_ones(tmp_path: Path) -> None:
    """Asking for an undeclared pipeline names the ones that exist."""
    with pytest.raises(UnknownPipeline, match="known: demo"):
        get_pipeline(write(tmp_path, GOOD), "nope")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("15m", 900), ("1h", 3600), ("1d", 86400), ("1w", 604800), (30, 30)],
)
def test_durations(text: str | int, seconds: int) -> None:
    """Durations read as a number and a unit."""
    assert parse_duration(text) == timedelta(seconds=seconds)


@given(
    start=st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2030, 1, 1)),
    span_minutes=st.integers(min_value=1, max_value=100_000),
    step_minutes=st.integers(min_value=1, max_value=5_000),
)
def test_slices_tile_the_range(start: datetime, span_minutes: int, step_minutes: int) -> None:
    """Windows are contiguous, non-empty, numbered 1..n, and cover exactly [start, end)."""
    start = start.replace(tzinfo=UTC)
    spec = SliceSpec(
        start=start,
        end=start + timedelta(minutes=span_minutes),
        step=timedelta(minutes=step_minutes),
    )
    windows = plan_slices(spec)
    assert windows[0].start == spec.start
    assert windows[-1].end == spec.end
    assert [w.index for w in windows] == list(range(1, len(windows) + 1))
    assert all(w.total == len(windows) for w in windows)
    assert all(a.end == b.start for a, b in itertools.pairwise(windows))
    assert all(w.start < w.end for w in windows)


@given(
    start=st.integers(-1000, 1000),
    span=st.integers(1, 5000),
    step=st.integers(1, 700),
)
def test_integer_slices_tile_the_range(start: int, span: int, step: int) -> None:
    """Integer windows (an id column) cover [start, end) contiguously, none empty."""
    windows = plan_slices(SliceSpec(start=start, end=start + span, step=step))
    assert windows[0].start == start and windows[-1].end == start + span
    assert all(a.end == b.start for a, b in itertools.pairwise(windows))
    assert all(0 < w.end - w.start <= step for w in windows)  # type: ignore[operator]


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ({"start": 0, "end": "2026-01-02T00:00:00Z", "step": 5}, "must all be integers"),
        ({"start": 0, "end": 10, "step": 0}, "step must be positive"),
        ({"start": 10, "end": 10, "step": 1}, "end must be after start"),
    ],
)
def test_integer_slice_errors(spec: dict[str, object], needle: str) -> None:
    """Mixed kinds, a zero step and an empty range are refused with a reason."""
    with pytest.raises(ValueError, match=needle):
        SliceSpec.model_validate(spec)


def test_a_pipeline_nested_too_deep_is_a_config_error(tmp_path: Path) -> None:
    """Pipeline config is bounded like any other input: 40 levels deep names the pipeline."""
    deep = "{ a = " * 40 + "1" + " }" * 40
    path = write(tmp_path, f'[pipelines.deep]\nsource = {{ type = "demo", extra = {deep} }}\n')
    with pytest.raises(ConfigError, match=r"pipeline 'deep'.*nested deeper than 32 levels"):
        load_pipelines(path)
