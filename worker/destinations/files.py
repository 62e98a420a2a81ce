"""The files destination: one file per slice (gzip'd JSONL or Parquet), published by rename.

File names are deterministic by run, resource and slice, so a redone slice
replaces its file. Rows go to a temporary file next to the final one, which
is fsync'd and renamed over it on publish: a reader sees the old file or the
whole new one, never half a slice. ``format = "parquet"`` needs the
``parquet`` extra (pyarrow); see :mod:`worker.destinations.parquet`.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any, Literal

from pydantic import BaseModel, ConfigDict

from worker.destinations.base import Publish, RunScope, SliceKey, SliceStats, StagedSlice
from worker.errors import ConfigError, DestinationError
from worker.pipelines import parse_options
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
    for stale in final.parent.glob(f".{final.name}.e*.tmp*"):
        found = _TEMP_EPOCH.search(stale.name)
        if found and int(found.group(1)) <= epoch:
            with contextlib.suppress(OSError):
                stale.unlink()
    return final.with_name(f".{final.name}.e{epoch}.tmp")


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
            self._gzip.write(("\n".join(lines) + "\n").encode("utf-8"))
            self.rows += len(lines)

    def seal(self) -> SliceStats:
        """Close the gzip stream and fsync the temporary file."""
        self._gzip.close()
        self._raw.flush()
        os.fsync(self._raw.fileno())
        self._raw.close()
        return SliceStats(rows=self.rows, files=1, bytes=self.temp.stat().st_size)

    def publish(self) -> None:
        """Rename over the final name: readers see the old file or the whole new one."""
        self.temp.replace(self.final)

    def discard(self) -> None:
        """Close and delete the temporary file."""
        with contextlib.suppress(OSError):
            self._gzip.close()
        with contextlib.suppress(OSError):
            self._raw.close()
        self.temp.unlink(missing_ok=True)


class FilesDestination:
    """Writes each slice to its own file under ``root``."""

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
        """Open a temporary file for the slice."""
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
        """Append publishes every slice as it commits: nothing is left for the run's end."""
        return None

    def abort(self, scope: RunScope, log: Logger) -> None:
        """Append keeps a failed run's committed slices."""

    def describe(self) -> dict[str, Any]:
        """Kind, format and root directory."""
        return {"type": "files", "format": self.format, "path": str(self.root)}

    def close(self) -> None:
        """Nothing held between slices."""
