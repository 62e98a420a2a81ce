"""The files destination: one gzip'd JSONL file per slice, published by atomic rename.

File names are deterministic by run, resource and slice, so a redone slice
replaces its file. Rows go to a temporary file next to the final one, which
is fsync'd and renamed over it on publish: a reader sees the old file or the
whole new one, never half a slice.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import IO, Any

from pydantic import BaseModel, ConfigDict, ValidationError

from worker.destinations.base import SliceKey, SliceStats
from worker.errors import ConfigError, DestinationError
from worker.sources.base import Row

#: gzip level: 1 costs a fraction of the CPU of 6 for ~10 % larger files.
COMPRESSLEVEL = 1


class FilesConfig(BaseModel):
    """Options of the files destination."""

    model_config = ConfigDict(extra="forbid")

    path: Path | None = None


def slice_path(root: Path, key: SliceKey) -> Path:
    """Where a slice's file lives: ``root/pipeline/run/resource/resource-00001.jsonl.gz``."""
    name = f"{key.resource}-{key.index:05d}.jsonl.gz" if key.index else f"{key.resource}.jsonl.gz"
    return root / key.pipeline / key.run_id / key.resource / name


class StagedFile:
    """A slice file being written under a temporary name."""

    def __init__(self, final: Path, epoch: int) -> None:
        self.final = final
        self.temp = final.with_name(f".{final.name}.e{epoch}.tmp")
        final.parent.mkdir(parents=True, exist_ok=True)
        self._remove_stale_temps(final, epoch)
        self._raw: IO[bytes] = self.temp.open("wb")
        self._gzip = gzip.GzipFile(fileobj=self._raw, mode="wb", compresslevel=COMPRESSLEVEL)
        self.rows = 0

    @staticmethod
    def _remove_stale_temps(final: Path, epoch: int) -> None:
        # A worker killed mid-slice leaves its temp file behind; a later epoch owns the slice now.
        for stale in final.parent.glob(f".{final.name}.e*.tmp"):
            with contextlib.suppress(ValueError, OSError):
                if int(stale.name.rsplit(".e", 1)[1].removesuffix(".tmp")) <= epoch:
                    stale.unlink()

    def write(self, rows: Iterable[Row]) -> None:
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
    """Writes each slice to its own gzip'd JSONL file under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @classmethod
    def from_options(cls, options: Mapping[str, Any], default_root: Path) -> FilesDestination:
        """Build from the pipeline's destination table."""
        try:
            config = FilesConfig.model_validate(dict(options))
        except ValidationError as exc:
            fields = "; ".join(
                f"destination.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                for e in exc.errors()
            )
            raise ConfigError(fields) from None
        return cls(config.path or default_root)

    def stage(self, key: SliceKey) -> StagedFile:
        """Open a temporary file for the slice."""
        try:
            return StagedFile(slice_path(self.root, key), key.epoch)
        except OSError as exc:
            msg = f"cannot write under {self.root}: {exc.strerror}"
            raise DestinationError(msg) from None

    def describe(self) -> dict[str, Any]:
        """Kind and root directory."""
        return {"type": "files", "path": str(self.root)}
