"""Sources: where a pipeline's rows come from, by ``source.type``."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from pydantic import BaseModel, ValidationError

from worker.errors import ConfigError, InvalidInput
from worker.sources.base import Row, Source
from worker.sources.demo import DemoConfig, DemoSource
from worker.sources.http import HttpConfig, HttpSource
from worker.sources.sql import SqlConfig, SqlSource

#: Source types by the name a pipeline's ``source.type`` uses.
SOURCES: dict[str, Callable[[Mapping[str, Any]], Source]] = {
    "demo": DemoSource.from_options,
    "http": HttpSource.from_options,
    "sql": SqlSource.from_options,
}


#: The options model of each source type (its pipeline table merged with a run's params).
OPTIONS: dict[str, type[BaseModel]] = {"demo": DemoConfig, "http": HttpConfig, "sql": SqlConfig}


def check_params(kind: str, options: Mapping[str, Any], params: Mapping[str, Any]) -> None:
    """Refuse run ``params`` a source of type ``kind`` would refuse once merged into its
    ``options``: an unknown name or a bad value is :class:`InvalidInput` naming the param.

    Only the params are judged: the pipeline's own options may still hold ``${ENV}``
    references, resolved when the run starts.
    """
    model = OPTIONS.get(kind)
    if model is None or not params:
        return
    try:
        model.model_validate({**options, **params})
    except ValidationError as exc:
        problems = [
            f"params.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
            for e in exc.errors()
            if e["loc"] and e["loc"][0] in params
        ]
        if problems:
            raise InvalidInput("; ".join(problems)) from None


def build_source(kind: str, options: Mapping[str, Any]) -> Source:
    """A source of type ``kind``; raises :class:`ConfigError` for an unknown type."""
    factory = SOURCES.get(kind)
    if factory is None:
        msg = f"source.type: unknown source {kind!r} (known: {', '.join(sorted(SOURCES))})"
        raise ConfigError(msg)
    return factory(options)


__all__ = ["OPTIONS", "SOURCES", "Row", "Source", "build_source", "check_params"]
