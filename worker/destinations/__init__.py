"""Destinations: where a pipeline's rows go, by ``destination.type``."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from worker.destinations.base import (
    Destination,
    Publish,
    RunScope,
    SliceKey,
    SliceStats,
    StagedSlice,
    WriteSpec,
)
from worker.destinations.files import FilesDestination
from worker.destinations.null import NullDestination
from worker.errors import ConfigError


def build_destination(kind: str, options: Mapping[str, Any], files_root: Path) -> Destination:
    """A destination of type ``kind``; raises :class:`ConfigError` for an unknown type."""
    if kind == "files":
        return FilesDestination.from_options(options, files_root)
    if kind == "sql":
        from worker.destinations.postgres import PostgresDestination  # noqa: PLC0415 - psycopg

        return PostgresDestination.from_options(dict(options))
    if kind == "null":
        if options:
            msg = f"destination: the null destination takes no options, got {sorted(options)}"
            raise ConfigError(msg)
        return NullDestination()
    msg = f"destination.type: unknown destination {kind!r} (known: files, null, sql)"
    raise ConfigError(msg)


__all__ = [
    "Destination",
    "Publish",
    "RunScope",
    "SliceKey",
    "SliceStats",
    "StagedSlice",
    "WriteSpec",
    "build_destination",
]
