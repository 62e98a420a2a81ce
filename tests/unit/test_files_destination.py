"""The files destination publishes whole slices atomically under deterministic names."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from worker.destinations import SliceKey
from worker.destinations.files import FilesDestination, slice_path
from worker.errors import DestinationError


def read(path: Path) -> list[dict[str, object]]:
    """Rows of a gzip'd JSONL file."""
    with gzip.open(path, "rt") as fh:
        return [json.loads(line) for line in fh]


def test_nothing_visible_until_publish(tmp_path: Path) -> None:
    """A staged slice is invisible until publish, then holds every row once."""
    dest = FilesDestination(tmp_path)
    key = SliceKey("p", "run_1", "events", 7, epoch=1)
    staged = dest.stage(key, None)
    staged.write([{"id": 1}, {"id": 2}])
    staged.write([{"id": 3}])
    final = slice_path(tmp_path, key)
    assert not final.exists()
    stats = staged.seal()
    assert not final.exists()
    staged.publish()
    assert read(final) == [{"id": 1}, {"id": 2}, {"id": 3}]
    assert (stats.rows, stats.files) == (3, 1)
    assert stats.bytes == final.stat().st_size
    assert final.name == "events-00007.jsonl.gz"
    assert not list(final.parent.glob(".*.tmp"))


def test_redone_slice_replaces(tmp_path: Path) -> None:
    """A later epoch writing the same slice replaces the file, never adds a second one."""
    dest = FilesDestination(tmp_path)
    for epoch, rows in ((1, [{"v": "old"}]), (2, [{"v": "new"}])):
        staged = dest.stage(SliceKey("p", "run_1", "events", 1, epoch=epoch), None)
        staged.write(rows)
        staged.seal()
        staged.publish()
    files = list((tmp_path / "p" / "run_1" / "events").iterdir())
    assert len(files) == 1
    assert read(files[0]) == [{"v": "new"}]


def test_discard_and_stale_temps_leave_nothing(tmp_path: Path) -> None:
    """Discard removes the temp file; a killed writer's temp is removed by the next epoch."""
    dest = FilesDestination(tmp_path)
    killed = dest.stage(SliceKey("p", "run_1", "events", 1, epoch=1), None)
    killed.write([{"id": 1}])  # never sealed: its process "died"
    staged = dest.stage(SliceKey("p", "run_1", "events", 1, epoch=2), None)
    staged.discard()
    assert list((tmp_path / "p" / "run_1" / "events").iterdir()) == []


def test_unserialisable_row_names_the_row(tmp_path: Path) -> None:
    """A row that cannot be serialised (here: circular) fails the slice naming the row."""
    staged = FilesDestination(tmp_path).stage(SliceKey("p", "r", "x", 1, epoch=1), None)
    circular: dict[str, object] = {}
    circular["self"] = circular
    with pytest.raises(DestinationError, match="row 2"):
        staged.write([{"ok": 1}, circular])
