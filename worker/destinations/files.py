"""The files destination: one file per slice (gzip'd JSONL or Parquet), published by rename.

File names are deterministic by run, resource and slice, so a redone slice
replaces its file. Rows go to a temporary file next to the final one, which
is fsync'd and renamed over it on publish: a reader sees the old file or the
whole new one, never half a slice. ``format = "parquet"`` needs the
``parquet`` extra (pyarrow); see :mod:`worker.destinations.parquet`.

Layout under the destination's ``path`` (``root``), by a resource's ``write_mode``::

    root/<pipeline>/<run_id>/<resource>/<resource>-00001.parquet  every run's slice files
    root/<pipeline>/latest/<resource> -> ../<run_id>/<resource>   replace: the current set
    root/<pipeline>/latest/<resource> -> ../_merged/<run_id>/<resource>   merge: the current set
    root/<pipeline>/_merged/<run_id>/<resource>/part-00000.parquet  merge: a compacted set

- **append**: each run adds its slice files under its own ``<run_id>/``
  directory; a slice is visible as soon as it commits. A failed or cancelled
  run leaves its committed slices (``on_failure = "keep"``) or nothing
  (``"remove"``: its ``<run_id>/<resource>/`` is deleted).
- **replace**: slices are written under ``<run_id>/<resource>/`` as for
  append, but readers go through ``latest/<resource>``: a relative symlink
  that the run's final commit points at the run's directory (a new link made
  under a temporary name and renamed over the old one). A run without rows
  publishes an empty directory. A failed or cancelled run's directory is
  deleted; ``latest`` keeps the last successful run's set.
- **merge** (Parquet only): slices are written under ``<run_id>/<resource>/``
  (the run's change set, kept like an append's). Before the final commit the
  published set and the run's rows are compacted into
  ``_merged/<run_id>/<resource>/``: one row per ``primary_key``, this run's
  rows winning (within the run a later slice, then a later row, wins), keys
  whose ``hard_delete`` column is true dropped, schemas unified permissively.
  The set has a ``_quarry_run_id`` column: the run that last wrote the row (a
  source column of that name is overwritten). A failed or cancelled run's
  slice files and unpublished compacted set are deleted; ``latest`` is
  untouched. Compaction holds the resource's whole data in memory: see
  :mod:`worker.destinations.parquet` for the bound.

Readers resolve ``latest/<resource>`` once (``os.path.realpath``) and read the
directory it names: that is one complete set, the old one or the new one. A
tool that lists files through the link and opens them later may mix two sets
across a swap. Each resource's link is swapped on its own: a run's resources
are not published as one.

A set that a publish supersedes stays until the resource's next publish and is
removed then (in that run's ``prepare_finish``), so a reader that resolved the
link just before a swap has until the next run's end to finish. The link
``latest/.<resource>.previous`` names that set.

Runs of one pipeline that end at the same time (``max_active_runs`` above 1):
for ``replace`` the later publish wins; for ``merge`` a publish whose published
set moved since it compacted fails, retryably, rather than drop the other run's
rows.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import re
import shutil
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

from pydantic import BaseModel, ConfigDict

from worker.destinations.base import (
    Publish,
    RunScope,
    SliceKey,
    SliceStats,
    StagedSlice,
    WriteSpec,
)
from worker.errors import ConfigError, DestinationError
from worker.pipelines import WriteMode, parse_options
from worker.runlog import Logger
from worker.sources.base import Page

#: gzip level: 1 costs a fraction of the CPU of 6 for ~10 % larger files.
COMPRESSLEVEL = 1


class FilesConfig(BaseModel):
    """Options of the files destination."""

    model_config = ConfigDict(extra="forbid")

    path: Path | None = None
    format: Literal["jsonl", "parquet"] = "jsonl"


#: The epoch in a temporary name: ``.name.e12.tmp`` (``.tmp.old`` while a Parquet file widens).
_TEMP_EPOCH = re.compile(r"\.e(\d+)\.tmp(?:\.old)?$")

#: File name suffix by format.
SUFFIXES = {"jsonl": ".jsonl.gz", "parquet": ".parquet"}


def slice_path(root: Path, key: SliceKey, suffix: str = ".jsonl.gz") -> Path:
    """Where a slice's file lives: ``root/pipeline/run/resource/resource-00001.jsonl.gz``."""
    name = f"{key.resource}-{key.index:05d}{suffix}" if key.index else f"{key.resource}{suffix}"
    return root / key.pipeline / key.run_id / key.resource / name


def temp_path(final: Path, epoch: int) -> Path:
    """The epoch's temporary name for ``final``, after removing older epochs' leftovers.

    A worker killed mid-slice leaves its temp file behind; a later epoch owns the slice now.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(final.parent, f".{final.name}.e*.tmp*", epoch)
    return final.with_name(f".{final.name}.e{epoch}.tmp")


def _remove_stale(directory: Path, pattern: str, epoch: int) -> None:
    """Remove the temporaries (files, links or directories) matching ``pattern`` that an
    epoch up to ``epoch`` left."""
    for stale in directory.glob(pattern):
        found = _TEMP_EPOCH.search(stale.name)
        if found and int(found.group(1)) <= epoch:
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    stale.unlink()


class StagedFile:
    """A gzip'd JSONL slice file being written under a temporary name."""

    def __init__(self, final: Path, epoch: int) -> None:
        self.final = final
        self.temp = temp_path(final, epoch)
        self._raw: IO[bytes] = self.temp.open("wb")
        self._gzip = gzip.GzipFile(fileobj=self._raw, mode="wb", compresslevel=COMPRESSLEVEL)
        self.rows = 0

    def write(self, rows: Page) -> None:
        """Append rows as JSON lines."""
        lines = []
        for row in rows:
            try:
                lines.append(json.dumps(row, separators=(",", ":"), default=str))
            except (TypeError, ValueError) as exc:
                msg = f"row {self.rows + len(lines) + 1} cannot be serialised: {exc}"
                raise DestinationError(msg) from None
        if lines:
            try:
                self._gzip.write(("\n".join(lines) + "\n").encode("utf-8"))
            except OSError as exc:
                raise write_failed(self.final, exc) from None
            self.rows += len(lines)

    def seal(self) -> SliceStats:
        """Close the gzip stream and fsync the temporary file."""
        try:
            self._gzip.close()
            self._raw.flush()
            os.fsync(self._raw.fileno())
            self._raw.close()
        except OSError as exc:
            raise write_failed(self.final, exc) from None
        return SliceStats(rows=self.rows, files=1, bytes=self.temp.stat().st_size)

    def publish(self) -> None:
        """Rename over the final name: readers see the old file or the whole new one.

        A second call (the checkpoint's transaction is retried after a store outage)
        finds the file already in place and does nothing.
        """
        publish_file(self.temp, self.final)

    def discard(self) -> None:
        """Close and delete the temporary file."""
        with contextlib.suppress(OSError):
            self._gzip.close()
        with contextlib.suppress(OSError):
            self._raw.close()
        self.temp.unlink(missing_ok=True)


def publish_file(temp: Path, final: Path) -> None:
    """Rename a sealed slice file over its final name; a second call (the checkpoint's
    transaction retried after a store outage) finds it in place and does nothing."""
    if final.exists() and not temp.exists():
        return
    temp.replace(final)


def write_failed(final: Path, exc: OSError) -> DestinationError:
    """A slice file that cannot be written (a full disk, a lost mount), said plainly; retryable,
    since the space may be freed before the next attempt."""
    what = exc.strerror or str(exc)
    msg = f"cannot write slice file {final}: {what} (errno {exc.errno})"
    return DestinationError(msg, retryable=True)


#: The directory under ``root/<pipeline>`` whose links name each resource's current set.
LATEST = "latest"
#: The directory under ``root/<pipeline>`` holding the compacted sets of ``merge`` resources.
MERGED = "_merged"
#: Event logged when removing an old or failed run's files did not work (the run goes on).
CLEANUP_FAILED = "destination_cleanup_failed"


def run_dir(root: Path, pipeline: str, run_id: str, resource: str) -> Path:
    """Where a run writes a resource's slice files: ``root/pipeline/run_id/resource``."""
    return root / pipeline / run_id / resource


def latest_link(root: Path, pipeline: str, resource: str) -> Path:
    """The stable path of a ``replace`` or ``merge`` resource: ``root/pipeline/latest/resource``."""
    return root / pipeline / LATEST / resource


def merged_dir(root: Path, pipeline: str, run_id: str, resource: str) -> Path:
    """Where a run compacts a ``merge`` resource: ``root/pipeline/_merged/run_id/resource``."""
    return root / pipeline / MERGED / run_id / resource


def published_dir(root: Path, pipeline: str, resource: str) -> Path | None:
    """The directory ``latest/<resource>`` names now (one complete set), or None if none yet.

    Read the set from the returned path, not through the link, so a swap while
    reading cannot mix two sets.
    """
    link = latest_link(root, pipeline, resource)
    target = _readlink(link)
    return None if target is None else _target_dir(link, target)


def fsync_path(path: Path) -> None:
    """Flush a file's or a directory's contents (a directory: its entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _readlink(link: Path) -> str | None:
    """The link's target as written, or None if there is no link."""
    try:
        return str(link.readlink())
    except FileNotFoundError:
        return None
    except OSError as exc:
        msg = (
            f"{link} is not a symlink: the files destination keeps {LATEST}/<resource> "
            f"as a link to the current set; move it away ({exc.strerror})"
        )
        raise DestinationError(msg) from None


def _target_dir(link: Path, target: str) -> Path:
    """The directory a link's (relative) target names, without following further links."""
    return Path(os.path.normpath(link.parent / target))


def _previous_link(link: Path) -> Path:
    """The hidden link naming the set ``link`` named before its last swap."""
    return link.with_name(f".{link.name}.previous")


def _point(link: Path, target: str, epoch: int) -> None:
    """Make ``link`` name ``target`` at once: a new link under a temporary name, renamed over."""
    temp = link.with_name(f".{link.name}.e{epoch}.tmp")
    temp.unlink(missing_ok=True)
    temp.symlink_to(target)
    temp.replace(link)


def _remove(path: Path, log: Logger) -> None:
    """Delete a directory tree (best effort), then its parent if that is left empty."""
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        if log is not None:
            log.warning(
                CLEANUP_FAILED,
                message=f"Could not remove {path}: {exc.strerror}",
                path=str(path),
            )
        return
    with contextlib.suppress(OSError):
        path.parent.rmdir()  # only succeeds when empty


@dataclass(frozen=True, slots=True)
class _Swap:
    """Points ``latest/<resource>`` at a prepared set; quick, atomic and idempotent."""

    link: Path
    #: The relative target to publish.
    target: str
    #: What the link named when the set was prepared (None: no link yet).
    base: str | None
    #: Refuse to publish if the link moved since ``base`` (``merge``: the set was built on it).
    guard: bool
    epoch: int

    def __call__(self) -> None:
        current = _readlink(self.link)
        if current == self.target:
            return  # published already (a second publish, or a redone end of the run)
        if self.guard and current != self.base:
            msg = (
                f"{self.link}: another run published {current} after this run merged onto "
                f"{self.base or 'no set'}; this run's merge is built again when it is retried"
            )
            raise DestinationError(msg, retryable=True)
        if not _target_dir(self.link, self.target).is_dir():
            msg = f"{self.link}: the prepared set {self.target} is gone; not publishing"
            raise DestinationError(msg, retryable=True)
        if current is not None:
            _point(_previous_link(self.link), current, self.epoch)
        _point(self.link, self.target, self.epoch)
        fsync_path(self.link.parent)


def check_write_mode(resource: str, spec: WriteSpec, fmt: str) -> None:
    """Raise :class:`ConfigError` if the files destination in ``fmt`` cannot write ``spec``."""
    if spec.mode is WriteMode.MERGE and fmt != "parquet":
        msg = (
            f'resources.{resource}.write_mode: "merge" on the files destination needs '
            f'destination.format = "parquet" ({fmt} files cannot be merged on a key); '
            'use write_mode "append" or "replace", or format "parquet"'
        )
        raise ConfigError(msg)


class FilesDestination:
    """Writes each slice to its own file under ``root``; see the module docstring for layout."""

    def __init__(self, root: Path, fmt: str = "jsonl") -> None:
        self.root = root
        self.format = fmt

    @classmethod
    def from_options(cls, options: Mapping[str, Any], default_root: Path) -> FilesDestination:
        """Build from the pipeline's destination table."""
        config = parse_options(FilesConfig, options, "destination")
        if config.format == "parquet":
            try:
                import pyarrow  # noqa: F401, PLC0415 - only checks the optional extra is there
            except ImportError:
                msg = "destination.format: parquet needs pyarrow: pip install 'quarry[parquet]'"
                raise ConfigError(msg) from None
        return cls(config.path or default_root, config.format)

    def stage(self, key: SliceKey, log: Logger) -> StagedSlice:
        """Open a temporary file for the slice (in the run's directory, whatever the mode)."""
        check_write_mode(key.resource, key.write, self.format)
        _check_names(key.run_id)
        final = slice_path(self.root, key, SUFFIXES[self.format])
        try:
            if self.format == "parquet":
                from worker.destinations.parquet import StagedParquet  # noqa: PLC0415 - optional

                return StagedParquet(final, key.epoch, log)
            return StagedFile(final, key.epoch)
        except OSError as exc:
            msg = f"cannot write under {self.root}: {exc.strerror}"
            raise DestinationError(msg) from None

    def prepare_finish(self, scope: RunScope, log: Logger) -> Publish | None:
        """Build each ``replace`` and ``merge`` resource's set; return the swap of their links.

        ``append`` has nothing left to do (its slices were published as they committed).
        """
        for resource, spec in scope.resources.items():
            check_write_mode(resource, spec, self.format)
        _check_names(scope.run_id)
        steps: list[Callable[[], None]] = []
        try:
            for resource, spec in scope.resources.items():
                if spec.mode is WriteMode.REPLACE:
                    steps.append(self._prepare_replace(scope, resource, log))
                elif spec.mode is WriteMode.MERGE:
                    steps.append(self._prepare_merge(scope, resource, spec, log))
        except OSError as exc:
            msg = f"cannot prepare the run's sets under {self.root}: {exc.strerror}"
            raise DestinationError(msg, retryable=True) from None
        if not steps:
            return None

        def publish() -> None:
            """Swap every prepared resource's ``latest`` link (each one atomically)."""
            try:
                for step in steps:
                    step()
            except OSError as exc:
                msg = f"cannot publish under {self.root}: {exc.strerror}"
                raise DestinationError(msg, retryable=True) from None

        return publish

    def _prepare_replace(self, scope: RunScope, resource: str, log: Logger) -> _Swap:
        """The run's directory is the new set: make sure it exists and holds only slices."""
        directory = run_dir(self.root, scope.pipeline, scope.run_id, resource)
        directory.mkdir(parents=True, exist_ok=True)  # a run without slices: an empty set
        _remove_stale(directory, ".*.tmp*", scope.epoch)  # every slice is done: temps are dead
        fsync_path(directory)
        fsync_path(directory.parent)
        target = str(Path("..", scope.run_id, resource))
        return self._swap(scope, resource, target, guard=False, log=log)

    def _prepare_merge(
        self, scope: RunScope, resource: str, spec: WriteSpec, log: Logger
    ) -> _Swap | Callable[[], None]:
        """Compact the published set and the run's slices into the run's merged set."""
        from worker.destinations.parquet import compact  # noqa: PLC0415 - the optional extra

        link = latest_link(self.root, scope.pipeline, resource)
        target = str(Path("..", MERGED, scope.run_id, resource))
        current = _readlink(link)
        if current == target:
            return _noop  # this run's set is published already: never rebuild what is read
        self._retire(link, current, target, scope.epoch, log)
        published = None if current is None else _target_dir(link, current)
        if published is not None and not published.is_dir():
            msg = (
                f"{link} names {current}, which is missing: the published set of {resource} "
                "is gone, and merging onto nothing would drop its rows; remove the link "
                "to start afresh"
            )
            raise DestinationError(msg)
        changes = run_dir(self.root, scope.pipeline, scope.run_id, resource)
        compact(
            published,
            _slice_files(changes, resource, SUFFIXES[self.format]),
            merged_dir(self.root, scope.pipeline, scope.run_id, resource),
            run_id=scope.run_id,
            primary_key=spec.primary_key,
            hard_delete=spec.hard_delete,
            epoch=scope.epoch,
            resource=resource,
            log=log,
        )
        return _Swap(link, target, current, guard=True, epoch=scope.epoch)

    def _swap(
        self, scope: RunScope, resource: str, target: str, *, guard: bool, log: Logger
    ) -> _Swap:
        link = latest_link(self.root, scope.pipeline, resource)
        current = _readlink(link)
        if current != target:
            self._retire(link, current, target, scope.epoch, log)
        return _Swap(link, target, current, guard=guard, epoch=scope.epoch)

    def _retire(
        self, link: Path, current: str | None, target: str, epoch: int, log: Logger
    ) -> None:
        """Remove the set published before the current one (superseded a publish ago),
        and temporary links that older epochs left next to ``link``."""
        link.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(link.parent, f".{link.name}.e*.tmp", epoch)
        _remove_stale(link.parent, f".{_previous_link(link).name}.e*.tmp", epoch)
        previous = _readlink(_previous_link(link))
        if previous is None:
            return
        keep = {_target_dir(link, t).resolve() for t in (current, target) if t is not None}
        old = _target_dir(link, previous).resolve()
        if old not in keep and old.is_relative_to(self.root.resolve()):
            _remove(old, log)

    def abort(self, scope: RunScope, log: Logger) -> None:
        """Remove what a failed or cancelled run must not leave (best effort, idempotent).

        ``append``: the run's directory of each ``on_failure = "remove"`` resource.
        ``replace``: the run's directory. ``merge``: the run's slice files and its
        compacted set. A set ``latest`` names (the run published before failing)
        is never removed.
        """
        for resource, spec in scope.resources.items():
            directory = run_dir(self.root, scope.pipeline, scope.run_id, resource)
            if spec.mode is WriteMode.APPEND:
                if spec.on_failure == "remove":
                    _remove(directory, log)
                continue
            published = self._published_sets(scope.pipeline, resource)
            doomed = [directory]
            if spec.mode is WriteMode.MERGE:
                merged = merged_dir(self.root, scope.pipeline, scope.run_id, resource)
                doomed.append(merged)
                if merged.parent.is_dir():  # an interrupted compaction's temporary set
                    doomed += merged.parent.glob(f".{resource}.e*.tmp")
            for path in doomed:
                if path.resolve() not in published:
                    _remove(path, log)

    def _published_sets(self, pipeline: str, resource: str) -> set[Path]:
        """The sets ``latest/<resource>`` and its previous link name now."""
        link = latest_link(self.root, pipeline, resource)
        try:
            targets = (_readlink(link), _readlink(_previous_link(link)))
        except DestinationError:
            return set()
        return {_target_dir(link, t).resolve() for t in targets if t is not None}

    def describe(self) -> dict[str, Any]:
        """Kind, format, root directory and where each run's and the current sets live."""
        return {
            "type": "files",
            "format": self.format,
            "path": str(self.root),
            "layout": (
                "<path>/<pipeline>/<run_id>/<resource>/ per run; replace and merge "
                f"resources' current set at <path>/<pipeline>/{LATEST}/<resource>/"
            ),
        }

    def close(self) -> None:
        """Nothing held between slices."""


def _noop() -> None:
    """A publish with nothing left to do."""


def _check_names(run_id: str) -> None:
    """A run id must not take the name of the pipeline directory's own entries."""
    if run_id in {LATEST, MERGED}:
        msg = f"run id {run_id!r} collides with the files destination's {run_id}/ directory"
        raise DestinationError(msg)


def _slice_index(path: Path, resource: str) -> int:
    """A slice file's number: ``resource-00042.parquet`` is 42, ``resource.parquet`` is 0."""
    stem = path.name.removeprefix(resource)
    found = re.match(r"-(\d+)\.", stem)
    return int(found.group(1)) if found else 0


def _slice_files(directory: Path, resource: str, suffix: str) -> list[Path]:
    """A run's published slice files of ``resource``, in slice order."""
    if not directory.is_dir():
        return []
    files: Iterable[Path] = (
        p for p in directory.iterdir() if p.name.endswith(suffix) and not p.name.startswith(".")
    )
    return sorted(files, key=lambda p: (_slice_index(p, resource), p.name))
