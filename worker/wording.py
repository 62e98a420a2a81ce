"""How counts and durations read in messages and tables: ``1,000 rows``, ``1m 6s``."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from worker.models import Run


def format_count(value: int) -> str:
    """``12500`` → ``12,500``."""
    return f"{value:,}"


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """``1 file``, ``3 files``, ``12,500 rows``; ``nouns`` when the plural is not noun + s."""
    return f"{format_count(count)} {noun if count == 1 else (nouns or noun + 's')}"


def format_duration(seconds: float) -> str:
    """``15300`` → ``4h 15m``; ``125`` → ``2m 5s``; ``3.25`` → ``3.2s``."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    total = round(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m {secs}s"


def tally(rows: int, files: int) -> str:
    """``1,000 rows, 3 files``; a destination that writes no files (a table) says rows only."""
    return f"{plural(rows, 'row')}, {plural(files, 'file')}" if files else plural(rows, "row")


def run_duration(run: Run, now: datetime | None = None, missing: str = "-") -> str:
    """How long the run has taken so far (or took): from its first start to its end (or
    ``now``), across every attempt, the figure its ``run_completed`` line gives too."""
    if run.started_at is None:
        return missing
    end = run.finished_at or now or datetime.now(UTC)
    return format_duration((end - run.started_at).total_seconds())


def attempt_summary(run: Run) -> str:
    """The attempt number, and what the attempts after the first were: ``3 (1 retry,
    1 recovery)``."""
    parts = []
    if run.retries:
        parts.append(plural(run.retries, "retry", "retries"))
    if run.recoveries:
        parts.append(plural(run.recoveries, "recovery", "recoveries"))
    return f"{run.attempt} ({', '.join(parts)})" if parts else str(run.attempt)
