"""Sources: where a pipeline's rows come from, by ``source.type``."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from worker.errors import ConfigError
from worker.sources.base import Row, Source
from worker.sources.demo import DemoSource
from worker.sources.http import HttpSource
from worker.sources.sql import SqlSource

#: Source types by the name a pipeline's ``source.type`` uses.
SOURCES: dict[str, Callable[[Mapping[str, Any]], Source]] = {
    "demo": DemoSource.from_options,
    "http": HttpSource.from_options,
    "sql": SqlSource.from_options,
}


def build_source(kind: str, options: Mapping[str, Any]) -> Source:
    """A source of type ``kind``; raises :class:`ConfigError` for an unknown type."""
    factory = SOURCES.get(kind)
    if factory is None:
        msg = f"source.type: unknown source {kind!r} (known: {', '.join(sorted(SOURCES))})"
        raise ConfigError(msg)
    return factory(options)


__all__ = ["SOURCES", "Row", "Source", "build_source"]
