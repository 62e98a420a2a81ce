"""A demo source that behaves like a marketing platform: profiles, sliced events, lists.

Deterministic from a seed: the same slice always yields the same rows, so a
redone slice can be compared with the first attempt. Pages come with a
configurable latency, like a paginated API.
"""

from __future__ import annotations

import random
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime, timedelta
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from worker.errors import ConfigError, SourceError
from worker.pipelines import ResourceConfig, Window, parse_options
from worker.sources.base import ReadContext, Row

METRICS = ("Received Email", "Opened Email", "Clicked Email", "Viewed Product", "Placed Order")
FIRST_NAMES = ("Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Frances", "Ken", "Radia")


class DemoConfig(BaseModel):
    """Knobs of the demo source; run params override them."""

    model_config = ConfigDict(extra="forbid")

    seed: int = 42
    profiles: int = Field(default=12_500, ge=0)
    events_per_slice: int = Field(default=500, ge=0)
    lists: int = Field(default=45, ge=0)
    page_size: int = Field(default=500, ge=1)
    page_latency_ms: float = Field(default=0.0, ge=0)
    #: ``resource:slice:page`` (1-based) at which to raise, to exercise failures.
    fail_at: str | None = None
    fail_message: str = "upstream returned HTTP 502"
    #: Any secret the source holds; only ever used to prove scrubbing.
    api_key: str | None = None


def _rng(seed: int, *parts: object) -> random.Random:
    key = ":".join(str(p) for p in (seed, *parts)).encode()
    return random.Random(zlib.crc32(key))  # noqa: S311 - demo data, not cryptography


class DemoSource:
    """The demo marketing platform."""

    def __init__(self, config: DemoConfig) -> None:
        self.config = config
        self._fail = self._parse_fail(config.fail_at)

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> DemoSource:
        """Build from the pipeline's source table merged with run params."""
        return cls(parse_options(DemoConfig, options, "source"))

    @staticmethod
    def _parse_fail(spec: str | None) -> tuple[str, int, int] | None:
        if not spec:
            return None
        try:
            resource, slice_no, page = spec.split(":")
            return resource, int(slice_no), int(page)
        except ValueError:
            msg = f"source.fail_at: expected resource:slice:page, got {spec!r}"
            raise ConfigError(msg) from None

    def read(
        self, resource: ResourceConfig, window: Window | None, _context: ReadContext
    ) -> Iterator[list[Row]]:
        """Yield pages of ``resource`` rows for ``window``."""
        name = resource.name
        make: Callable[[int, Window | None], Row]
        if name == "profiles":
            total, make = self.config.profiles, self._profile
        elif name == "events":
            total, make = self._events_in(window), self._event
        elif name == "lists":
            total, make = self.config.lists, self._list
        else:
            msg = f"demo source has no resource {name!r} (profiles, events, lists)"
            raise SourceError(msg)
        slice_no = window.index if window else 0
        page_size = self.config.page_size
        for page_no, offset in enumerate(range(0, max(total, 1), page_size), start=1):
            if self.config.page_latency_ms:
                time.sleep(self.config.page_latency_ms / 1000)
            if self._fail == (name, slice_no, page_no):
                raise SourceError(self.config.fail_message)
            count = min(page_size, total - offset)
            if count <= 0:
                return
            yield [make(offset + i, window) for i in range(count)]

    def _events_in(self, window: Window | None) -> int:
        base = self.config.events_per_slice
        if window is None or base == 0:
            return base
        # Some hours are busier than others; the same window always has the same count.
        return base + _rng(self.config.seed, "count", window.index).randint(-base // 5, base // 5)

    def _profile(self, n: int, _window: Window | None) -> Row:
        rng = _rng(self.config.seed, "profile", n)
        name = rng.choice(FIRST_NAMES)
        return {
            "id": f"prof_{n:08d}",
            "email": f"{name.lower()}.{n}@example.com",
            "first_name": name,
            "consent": rng.random() < 0.7,
            "lifetime_value": round(rng.uniform(0, 2000), 2),
        }

    def _event(self, n: int, window: Window | None) -> Row:
        index = window.index if window else 0
        rng = _rng(self.config.seed, "event", index, n)
        at = None
        if window and isinstance(window.start, datetime) and isinstance(window.end, datetime):
            span = (window.end - window.start).total_seconds()
            at = window.start + timedelta(seconds=rng.uniform(0, span))
        return {
            "id": f"evt_{index:05d}_{n:07d}",
            "profile_id": f"prof_{rng.randrange(max(self.config.profiles, 1)):08d}",
            "metric": rng.choice(METRICS),
            "timestamp": at.isoformat() if at else None,
            "value": round(rng.uniform(0, 250), 2),
        }

    def _list(self, n: int, _window: Window | None) -> Row:
        rng = _rng(self.config.seed, "list", n)
        return {"id": f"list_{n:04d}", "name": f"Segment {n}", "size": rng.randint(10, 50_000)}

    def close(self) -> None:
        """Nothing to release."""
