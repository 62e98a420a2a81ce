"""The demo source is deterministic, paged, and fails on request."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from worker.errors import ConfigError, SourceError
from worker.pipelines import ResourceConfig, Window
from worker.sources import build_source
from worker.sources.base import ReadContext
from worker.sources.demo import DemoSource

CTX = ReadContext(log=None)
WINDOW = Window(3, 10, datetime(2026, 1, 1, 2, tzinfo=UTC), datetime(2026, 1, 1, 3, tzinfo=UTC))


def test_same_slice_same_rows() -> None:
    """Reading a slice twice yields identical rows: redone slices can be compared."""
    source = DemoSource.from_options({"events_per_slice": 120, "page_size": 50})
    first = [
        row for page in source.read(ResourceConfig(name="events"), WINDOW, CTX) for row in page
    ]
    again = [
        row for page in source.read(ResourceConfig(name="events"), WINDOW, CTX) for row in page
    ]
    assert first == again
    assert len({r["id"] for r in first}) == len(first)
    assert all(WINDOW.start.isoformat() <= r["timestamp"] < WINDOW.end.isoformat() for r in first)


def test_pages_respect_page_size() -> None:
    """Rows arrive in pages no larger than page_size."""
    source = DemoSource.from_options({"profiles": 1001, "page_size": 100})
    pages = list(source.read(ResourceConfig(name="profiles"), None, CTX))
    assert [len(p) for p in pages] == [100] * 10 + [1]


def test_fail_at_raises_mid_slice() -> None:
    """fail_at raises a SourceError at the named page, after earlier pages were yielded."""
    source = DemoSource.from_options(
        {"events_per_slice": 100, "page_size": 10, "fail_at": "events:3:4"}
    )
    pages = source.read(ResourceConfig(name="events"), WINDOW, CTX)
    got = [next(pages) for _ in range(3)]
    assert len(got) == 3
    with pytest.raises(SourceError):
        next(pages)


def test_bad_options_name_the_field() -> None:
    """Unknown or invalid source options raise ConfigError naming the field."""
    with pytest.raises(ConfigError, match=r"source\.page_size"):
        build_source("demo", {"page_size": 0})
    with pytest.raises(ConfigError, match=r"source\.nope"):
        build_source("demo", {"nope": 1})
    with pytest.raises(ConfigError, match="unknown source 'ftp'"):
        build_source("ftp", {})
