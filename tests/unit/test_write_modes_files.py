"""Write modes on the files destination: append, replace and merge, and the ``latest/`` links."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from worker.destinations import RunScope, SliceKey, WriteSpec
from worker.destinations.files import (
    FilesDestination,
    latest_link,
    merged_dir,
    published_dir,
    run_dir,
)
from worker.errors import ConfigError, DestinationError
from worker.pipelines import WriteMode

Rows = list[dict[str, Any]]

APPEND_KEEP = WriteSpec(WriteMode.APPEND)
APPEND_REMOVE = WriteSpec(WriteMode.APPEND, on_failure="remove")
REPLACE = WriteSpec(WriteMode.REPLACE)
MERGE = WriteSpec(WriteMode.MERGE, primary_key=("id",), hard_delete="deleted")


class RecordingLog:
    """Stands in for the run's logger: keeps (level, event, fields)."""

    def __init__(self) -> None:
        self.records: list[tuple[str, str, dict[str, Any]]] = []

    def info(self, event: str, **fields: Any) -> None:
        """Record an info entry."""
        self.records.append(("info", str(event), fields))

    def warning(self, event: str, **fields: Any) -> None:
        """Record a warning entry."""
        self.records.append(("warning", str(event), fields))

    def events(self, name: str) -> list[dict[str, Any]]:
        """The fields of every entry named ``name``."""
        return [fields for _, event, fields in self.records if event == name]


LOG: Any = RecordingLog()


def write_run(
    dest: FilesDestination,
    run_id: str,
    slices: dict[str, Sequence[Rows]],
    specs: dict[str, WriteSpec],
    *,
    epoch: int = 1,
    log: Any = LOG,
) -> RunScope:
    """Stage, seal and publish every slice of a run (1-based); the run's end scope."""
    for resource, pages in slices.items():
        for index, rows in enumerate(pages, start=1):
            key = SliceKey("p", run_id, resource, index, epoch, write=specs[resource])
            staged = dest.stage(key, log)
            staged.write(rows)
            staged.seal()
            staged.publish()
    return RunScope("p", run_id, epoch, specs)


def finish(dest: FilesDestination, scope: RunScope, log: Any = LOG) -> None:
    """The run's end as the runner does it: prepare, then publish."""
    publish = dest.prepare_finish(scope, log)
    assert publish is not None
    publish()


def read_set(directory: Path) -> Rows:
    """Every row of one set (a directory of JSONL or Parquet files), in file order."""
    rows: Rows = []
    for path in sorted(p for p in directory.iterdir() if not p.name.startswith(".")):
        if path.name.endswith(".jsonl.gz"):
            with gzip.open(path, "rt") as fh:
                rows += [json.loads(line) for line in fh]
        else:
            import pyarrow.parquet as pq

            rows += pq.read_table(path).to_pylist()
    return rows


def latest(root: Path, resource: str) -> Rows:
    """The rows ``latest/<resource>`` shows, read the way the docs tell readers to."""
    directory = published_dir(root, "p", resource)
    assert directory is not None
    return read_set(directory)


def parquet_dest(root: Path) -> FilesDestination:
    """A Parquet files destination (skips without pyarrow)."""
    pytest.importorskip("pyarrow")
    return FilesDestination(root, "parquet")


def dest_for(root: Path, fmt: str) -> FilesDestination:
    """A files destination in ``fmt``."""
    return parquet_dest(root) if fmt == "parquet" else FilesDestination(root, fmt)


# append


def test_append_abort_removes_or_keeps_the_run_per_on_failure(tmp_path: Path) -> None:
    """``remove`` deletes the failed run's directory of that resource; ``keep`` leaves it."""
    dest = FilesDestination(tmp_path)
    specs = {"gone": APPEND_REMOVE, "kept": APPEND_KEEP}
    scope = write_run(dest, "run_1", {"gone": [[{"id": 1}]], "kept": [[{"id": 2}]]}, specs)
    assert dest.prepare_finish(scope, LOG) is None  # append publishes slice by slice
    dest.abort(scope, LOG)
    dest.abort(scope, LOG)  # idempotent
    assert not run_dir(tmp_path, "p", "run_1", "gone").exists()
    assert read_set(run_dir(tmp_path, "p", "run_1", "kept")) == [{"id": 2}]
    assert not (tmp_path / "p" / "latest").exists()


# replace


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_replace_shows_exactly_the_last_successful_run(tmp_path: Path, fmt: str) -> None:
    """Two runs with different rows: ``latest`` holds exactly the second's, through a
    relative link (the tree can be moved)."""
    dest = dest_for(tmp_path / "out", fmt)
    specs = {"orders": REPLACE}
    first = [[{"id": i, "run": "run_1"} for i in range(3)], [{"id": 3, "run": "run_1"}]]
    finish(dest, write_run(dest, "run_1", {"orders": first}, specs))
    assert latest(dest.root, "orders") == [row for page in first for row in page]
    second = [[{"id": 10, "run": "run_2"}], [{"id": 11, "run": "run_2"}]]
    finish(dest, write_run(dest, "run_2", {"orders": second}, specs))
    assert latest(dest.root, "orders") == [{"id": 10, "run": "run_2"}, {"id": 11, "run": "run_2"}]
    link = latest_link(dest.root, "p", "orders")
    assert not str(link.readlink()).startswith("/")
    moved = tmp_path / "moved"
    shutil.move(dest.root, moved)
    assert read_set(latest_link(moved, "p", "orders")) == [
        {"id": 10, "run": "run_2"},
        {"id": 11, "run": "run_2"},
    ]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_a_failed_replace_run_leaves_latest_on_the_last_success(tmp_path: Path, fmt: str) -> None:
    """Abort removes the failed run's directory; ``latest`` is untouched."""
    dest = dest_for(tmp_path, fmt)
    specs = {"orders": REPLACE}
    finish(dest, write_run(dest, "run_1", {"orders": [[{"id": 1}]]}, specs))
    failed = write_run(dest, "run_2", {"orders": [[{"id": 2}]]}, specs)
    dest.abort(failed, LOG)
    dest.abort(failed, LOG)
    assert latest(tmp_path, "orders") == [{"id": 1}]
    assert not run_dir(tmp_path, "p", "run_2", "orders").exists()


def test_a_run_that_published_then_failed_keeps_its_published_set(tmp_path: Path) -> None:
    """Abort never removes the set ``latest`` names (a crash after publish, then a failure)."""
    dest = FilesDestination(tmp_path)
    scope = write_run(dest, "run_1", {"orders": [[{"id": 1}]]}, {"orders": REPLACE})
    finish(dest, scope)
    dest.abort(scope, LOG)
    assert latest(tmp_path, "orders") == [{"id": 1}]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_an_empty_replace_run_shows_no_rows(tmp_path: Path, fmt: str) -> None:
    """No slices at all, or slices without rows: ``latest`` then shows an empty set."""
    dest = dest_for(tmp_path, fmt)
    specs = {"none": REPLACE, "empty": REPLACE}
    finish(dest, write_run(dest, "run_1", {"none": [[{"id": 1}]], "empty": [[{"id": 2}]]}, specs))
    finish(dest, write_run(dest, "run_2", {"none": [], "empty": [[], []]}, specs))
    assert latest(tmp_path, "none") == []
    assert latest(tmp_path, "empty") == []
    if fmt == "parquet":
        import pyarrow.dataset as ds

        for resource in ("none", "empty"):
            assert ds.dataset(latest_link(tmp_path, "p", resource)).to_table().num_rows == 0


def test_publishing_twice_is_a_no_op(tmp_path: Path) -> None:
    """A second publish, or a redone end of the run (prepare + publish again), changes nothing."""
    dest = FilesDestination(tmp_path)
    specs = {"orders": REPLACE}
    finish(dest, write_run(dest, "run_1", {"orders": [[{"id": 1}]]}, specs))
    scope = write_run(dest, "run_2", {"orders": [[{"id": 2}]]}, specs)
    publish = dest.prepare_finish(scope, LOG)
    assert publish is not None
    publish()
    link = latest_link(tmp_path, "p", "orders")
    state = (str(link.readlink()), str(link.with_name(".orders.previous").readlink()))
    publish()
    finish(dest, scope)  # after a crash between publish and the final commit
    assert (str(link.readlink()), str(link.with_name(".orders.previous").readlink())) == state
    assert latest(tmp_path, "orders") == [{"id": 2}]
    assert read_set(run_dir(tmp_path, "p", "run_1", "orders")) == [{"id": 1}]


def test_a_superseded_set_is_removed_at_the_next_publish(tmp_path: Path) -> None:
    """The documented choice: the previous set stays one publish longer, then goes."""
    dest = FilesDestination(tmp_path)
    specs = {"orders": REPLACE}
    for n in (1, 2, 3):
        finish(dest, write_run(dest, f"run_{n}", {"orders": [[{"id": n}]]}, specs))
    assert not (tmp_path / "p" / "run_1").exists()
    assert read_set(run_dir(tmp_path, "p", "run_2", "orders")) == [{"id": 2}]
    assert latest(tmp_path, "orders") == [{"id": 3}]


def test_a_reader_always_sees_one_whole_set(tmp_path: Path) -> None:
    """A reader resolving ``latest`` while publishes happen reads every row of one run."""
    dest = parquet_dest(tmp_path)
    specs = {"orders": REPLACE}
    runs = 25
    scopes = [
        write_run(
            dest,
            f"run_{n:02d}",
            {
                "orders": [
                    [{"id": i, "run": f"run_{n:02d}"} for i in range(s, s + 40)]
                    for s in (0, 40, 80)
                ]
            },
            specs,
        )
        for n in range(runs)
    ]
    finish(dest, scopes[0])
    done = threading.Event()
    seen: list[str] = []
    broken: list[str] = []
    retired = 0

    link = latest_link(tmp_path, "p", "orders")

    def reader() -> None:
        nonlocal retired
        while not done.is_set():
            try:
                directory = os.path.realpath(link, strict=True)
            except OSError as exc:
                broken.append(f"{link} did not resolve: {exc}")
                continue
            try:
                rows: Rows | None = read_set(Path(directory))
            except FileNotFoundError:
                rows = None
            if os.path.realpath(link) != directory:
                # Retired by a later publish while being read (documented): its files go one
                # by one, so the read may have found some, none or an error. A set goes only
                # after the link has left it, so one still current when the read ended was
                # whole throughout.
                retired += 1
                continue
            if rows is None:
                broken.append(f"{directory}: files missing from the current set")
                continue
            runs_seen = {row["run"] for row in rows}
            if len(rows) != 120 or len(runs_seen) != 1:
                broken.append(f"{directory}: {len(rows)} rows from {sorted(runs_seen)}")
            seen.extend(runs_seen)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for scope in scopes[1:]:
            finish(dest, scope)
    finally:
        done.set()
        thread.join()
    assert broken == []
    assert seen
    assert latest(tmp_path, "orders")[0]["run"] == f"run_{runs - 1:02d}"


# merge


def merged_rows(root: Path, resource: str = "orders") -> Rows:
    """The merged set's rows, by key."""
    return sorted(latest(root, resource), key=lambda row: row["id"])


def test_merge_keeps_one_row_per_key_with_the_latest_values(tmp_path: Path) -> None:
    """Updated, new and hard-deleted rows across two runs; later slices and rows win in a run."""
    dest = parquet_dest(tmp_path)
    specs = {"orders": MERGE}
    first = [
        [{"id": i, "v": f"a{i}", "deleted": False} for i in (1, 2, 3)],
        [{"id": i, "v": f"a{i}", "deleted": False} for i in (4, 5)],
    ]
    finish(dest, write_run(dest, "run_1", {"orders": first}, specs))
    assert [r["v"] for r in merged_rows(tmp_path)] == ["a1", "a2", "a3", "a4", "a5"]
    second = [
        [
            {"id": 2, "v": "b2", "deleted": False},  # update
            {"id": 3, "v": None, "deleted": True},  # hard delete
            {"id": 6, "v": "b6", "deleted": False},  # new
            {"id": 4, "v": "b4-early", "deleted": False},
            {"id": 6, "v": "b6-later-row", "deleted": None},  # later row in a slice wins
        ],
        [
            {"id": 4, "v": "b4", "deleted": False},  # later slice wins
            {"id": 7, "v": "b7", "deleted": True},  # deleting a key never seen
            {"id": 5, "v": "b5-gone", "deleted": True},
        ],
        [{"id": 5, "v": "b5-back", "deleted": False}],  # deleted, then back again
    ]
    finish(dest, write_run(dest, "run_2", {"orders": second}, specs))
    assert merged_rows(tmp_path) == [
        {"id": 1, "v": "a1", "deleted": False, "_quarry_run_id": "run_1"},
        {"id": 2, "v": "b2", "deleted": False, "_quarry_run_id": "run_2"},
        {"id": 4, "v": "b4", "deleted": False, "_quarry_run_id": "run_2"},
        {"id": 5, "v": "b5-back", "deleted": False, "_quarry_run_id": "run_2"},
        {"id": 6, "v": "b6-later-row", "deleted": None, "_quarry_run_id": "run_2"},
    ]
    target = str(latest_link(tmp_path, "p", "orders").readlink())
    assert target == str(Path("..", "_merged", "run_2", "orders"))
    assert [p.name for p in merged_dir(tmp_path, "p", "run_2", "orders").iterdir()] == [
        "part-00000.parquet"
    ]


def test_merge_on_a_composite_key(tmp_path: Path) -> None:
    """Rows are one per (region, id): the same id in two regions is two rows."""
    dest = parquet_dest(tmp_path)
    specs = {"orders": WriteSpec(WriteMode.MERGE, primary_key=("region", "id"))}
    first = [[{"region": "eu", "id": 1, "v": 1}, {"region": "us", "id": 1, "v": 2}]]
    finish(dest, write_run(dest, "run_1", {"orders": first}, specs))
    second = [[{"region": "us", "id": 1, "v": 3}, {"region": "us", "id": 2, "v": 4}]]
    finish(dest, write_run(dest, "run_2", {"orders": second}, specs))
    rows = sorted(latest(tmp_path, "orders"), key=lambda r: (r["region"], r["id"]))
    assert [(r["region"], r["id"], r["v"], r["_quarry_run_id"]) for r in rows] == [
        ("eu", 1, 1, "run_1"),
        ("us", 1, 3, "run_2"),
        ("us", 2, 4, "run_2"),
    ]


def test_merge_keeps_a_new_column_and_older_rows_read_null(tmp_path: Path) -> None:
    """A column the second run adds appears; rows it did not touch read null; int widens."""
    dest = parquet_dest(tmp_path)
    specs = {"orders": MERGE}
    log = RecordingLog()
    finish(
        dest, write_run(dest, "run_1", {"orders": [[{"id": 1, "n": 1}, {"id": 2, "n": 2}]]}, specs)
    )
    second = {"orders": [[{"id": 2, "n": 2.5, "country": "NL"}]]}
    finish(dest, write_run(dest, "run_2", second, specs, log=log), log=log)
    assert merged_rows(tmp_path) == [
        {"id": 1, "n": 1.0, "country": None, "_quarry_run_id": "run_1"},
        {"id": 2, "n": 2.5, "country": "NL", "_quarry_run_id": "run_2"},
    ]
    (change,) = log.events("schema_changed")
    assert change["added_columns"] == ["country"]
    assert change["widened_columns"] == {"n": "int64 -> double"}


def test_merge_with_jsonl_is_a_config_error_naming_write_mode(tmp_path: Path) -> None:
    """JSONL cannot merge on a key: staging the first slice (or the run's end) says so."""
    dest = FilesDestination(tmp_path, "jsonl")
    with pytest.raises(ConfigError, match="write_mode"):
        dest.stage(SliceKey("p", "run_1", "orders", 1, 1, write=MERGE), LOG)
    with pytest.raises(ConfigError, match=r"resources\.orders\.write_mode"):
        dest.prepare_finish(RunScope("p", "run_1", 1, {"orders": MERGE}), LOG)
    assert not (tmp_path / "p").exists()


def test_a_failed_merge_run_leaves_latest_untouched(tmp_path: Path) -> None:
    """Abort removes the run's slice files; the published set stays as it was."""
    dest = parquet_dest(tmp_path)
    specs = {"orders": MERGE}
    finish(dest, write_run(dest, "run_1", {"orders": [[{"id": 1, "v": "a"}]]}, specs))
    failed = write_run(dest, "run_2", {"orders": [[{"id": 1, "v": "b"}]]}, specs)
    dest.abort(failed, LOG)
    assert [r["v"] for r in merged_rows(tmp_path)] == ["a"]
    assert not run_dir(tmp_path, "p", "run_2", "orders").exists()
    assert not merged_dir(tmp_path, "p", "run_2", "orders").exists()


def test_merge_publishes_once_and_splits_large_sets_into_parts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Parts hold at most PART_ROWS rows; a redone end of the run never rebuilds a read set."""
    dest = parquet_dest(tmp_path)
    monkeypatch.setattr("worker.destinations.parquet.PART_ROWS", 4)
    specs = {"orders": MERGE}
    finish(
        dest, write_run(dest, "run_1", {"orders": [[{"id": i, "v": 1} for i in range(10)]]}, specs)
    )
    scope = write_run(dest, "run_2", {"orders": [[{"id": i, "v": 2} for i in range(5, 12)]]}, specs)
    finish(dest, scope)
    parts = sorted(merged_dir(tmp_path, "p", "run_2", "orders").iterdir())
    assert [p.name for p in parts] == [f"part-0000{i}.parquet" for i in range(3)]
    inodes = [p.stat().st_ino for p in parts]
    finish(dest, scope)
    assert [p.stat().st_ino for p in parts] == inodes
    assert [(r["id"], r["v"]) for r in merged_rows(tmp_path)] == [
        (i, 1 if i < 5 else 2) for i in range(12)
    ]


def test_a_merge_onto_a_set_that_moved_since_fails_retryably(tmp_path: Path) -> None:
    """Two runs merged onto the same set: the second publish refuses rather than lose rows."""
    dest = parquet_dest(tmp_path)
    specs = {"orders": MERGE}
    a = write_run(dest, "run_a", {"orders": [[{"id": 1, "v": "a"}]]}, specs)
    b = write_run(dest, "run_b", {"orders": [[{"id": 2, "v": "b"}]]}, specs)
    publish_a, publish_b = dest.prepare_finish(a, LOG), dest.prepare_finish(b, LOG)
    assert publish_a is not None and publish_b is not None
    publish_a()
    with pytest.raises(DestinationError, match="another run published") as caught:
        publish_b()
    assert caught.value.retryable
    finish(dest, b)  # the retry merges onto run_a's set
    assert [(r["id"], r["v"]) for r in merged_rows(tmp_path)] == [(1, "a"), (2, "b")]


def test_a_merge_key_must_be_present_and_not_null(tmp_path: Path) -> None:
    """A slice without the key column, or with a null key, fails naming column and row."""
    dest = parquet_dest(tmp_path)
    specs = {"orders": MERGE}
    scope = write_run(dest, "run_1", {"orders": [[{"id": 1}, {"id": None}]]}, specs)
    with pytest.raises(DestinationError, match=r"'id' is null in row 2 of orders-00001"):
        dest.prepare_finish(scope, LOG)
    scope = write_run(dest, "run_2", {"orders": [[{"other": 1}]]}, specs)
    with pytest.raises(DestinationError, match=r"'id' is missing from orders-00001"):
        dest.prepare_finish(scope, LOG)


def test_an_interrupted_merge_leaves_nothing_behind(tmp_path: Path) -> None:
    """A killed compaction's temporary set goes at the next epoch's attempt, or at abort."""
    dest = parquet_dest(tmp_path)
    specs = {"orders": MERGE}
    write_run(dest, "run_1", {"orders": [[{"id": 1}]]}, specs)
    killed = merged_dir(tmp_path, "p", "run_1", "orders").with_name(".orders.e1.tmp")
    killed.mkdir(parents=True)
    (killed / "part-00000.parquet").write_bytes(b"half")
    finish(dest, RunScope("p", "run_1", 2, specs))
    assert not killed.exists()
    assert [r["id"] for r in merged_rows(tmp_path)] == [1]
    failed = write_run(dest, "run_2", {"orders": [[{"id": 2}]]}, specs)
    leftover = merged_dir(tmp_path, "p", "run_2", "orders").with_name(".orders.e1.tmp")
    leftover.mkdir(parents=True)
    dest.abort(failed, LOG)
    assert not (tmp_path / "p" / "_merged" / "run_2").exists()
    assert not (tmp_path / "p" / "run_2").exists()
    assert [r["id"] for r in merged_rows(tmp_path)] == [1]
