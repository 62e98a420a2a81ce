"""What the CLI shows a person: log lines like the run-log docs, run tables, a live follow."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from worker import jsonfmt, telemetry, wording
from worker.models import Entry, Level, Run, Status
from worker.runlog import escape_controls
from worker.store import Store
from worker.wording import format_count

_LEVEL_STYLE = {
    Level.DEBUG: "dim",
    Level.INFO: "green",
    Level.WARNING: "yellow",
    Level.ERROR: "bold red",
}
_STATUS_STYLE = {
    Status.QUEUED: "cyan",
    Status.RUNNING: "blue",
    Status.SUCCEEDED: "green",
    Status.FAILED: "bold red",
    Status.CANCELLED: "magenta",
    Status.INTERRUPTED: "yellow",
}
#: How often ``--follow`` polls the store for new entries.
POLL_SECONDS = 0.2


def entry_line(entry: Entry) -> Text:
    """``10:30:01 [info] resource_started - Extracting profiles (1/3)``, control chars escaped.

    Built from Text parts, never markup, so no logged text can restyle or forge a line.
    """
    line = Text()
    line.append(entry.occurred_at.astimezone().strftime("%H:%M:%S"), style="dim")
    line.append(" [")
    line.append(entry.level.value, style=_LEVEL_STYLE.get(entry.level, ""))
    line.append("] ")
    line.append(escape_controls(entry.event), style="bold")
    line.append(" - ")
    line.append(escape_controls(entry.message))
    return line


#: Characters valid in JSON text that a terminal or a line-based reader acts on: C1 controls
#: (0x9B is a CSI), NEL, the Unicode line and paragraph separators, and bidi overrides.
_UNSAFE_IN_JSON = re.compile("[\u0080-\u009f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def json_text(value: Any) -> str:
    """``value`` as one line of JSON that is safe on a terminal and in a line-based file.

    Any value survives (:func:`worker.jsonfmt.safe_bytes`); the characters above are
    written as ``\\uXXXX`` escapes, which every JSON reader decodes to the same text.
    """
    text = jsonfmt.safe_bytes(value).decode()
    return _UNSAFE_IN_JSON.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def entry_json(entry: Entry) -> str:
    """One entry as a JSON line (see :func:`json_text`)."""
    return json_text(entry.as_dict())


def plain(value: str) -> Text:
    """Text from the store or a client as inert text: never markup, control characters escaped."""
    return Text(escape_controls(value))


def run_duration(run: Run) -> str:
    """How long the run has taken so far (or took), across every attempt."""
    return wording.run_duration(run)


def status_text(status: Status) -> Text:
    """A status, coloured."""
    return Text(status.value, style=_STATUS_STYLE.get(status, ""))


#: What a column costs besides its cells: a space each side and the separator.
_COLUMN_OVERHEAD = 3
#: The narrowest a wrapping column gets before it is dropped instead.
_MIN_WRAPPED = 10


def table(
    columns: list[tuple[str, list[str | Text]]],
    *,
    width: int,
    keep: int = 1,
    right: frozenset[str] = frozenset(),
) -> Table:
    """A borderless table that fits ``width`` by dropping columns, never by cutting ids.

    ``columns`` are ``(header, cells)`` in priority order: the first ``keep`` are
    always shown whole (ids, names a person copies), the rest are dropped from the
    last while even their narrowest (wrapped) width would not fit, as ``gh`` does.
    """

    def measure(header: str, cells: list[str | Text]) -> int:
        return max(
            [len(header), *(Text(c).cell_len if isinstance(c, str) else c.cell_len for c in cells)]
        )

    def least(index: int, header: str, cells: list[str | Text]) -> int:
        # A kept column needs all of its width; another may wrap down to a short word.
        natural = measure(header, cells)
        return natural if index < keep else min(natural, max(len(header), _MIN_WRAPPED))

    shown = list(columns)
    while len(shown) > keep and (
        sum(least(i, *c) + _COLUMN_OVERHEAD for i, c in enumerate(shown)) > width
    ):
        shown.pop()
    result = Table(show_edge=False, header_style="bold")
    for index, (header, cells) in enumerate(shown):
        whole = index < keep
        result.add_column(
            header,
            justify="right" if header in right else "left",
            no_wrap=whole,
            min_width=measure(header, cells) if whole else None,
        )
    for row in zip(*(cells for _, cells in shown), strict=True):
        result.add_row(*(plain(c) if isinstance(c, str) else c for c in row))
    return result


def plain_table(
    columns: tuple[str, ...], rows: list[tuple[str, ...]], *, width: int, keep: int = 1
) -> Table:
    """Rows as a table that fits ``width``; the first ``keep`` columns are kept whole."""
    return table(
        [(name, [row[i] for row in rows]) for i, name in enumerate(columns)], width=width, keep=keep
    )


def runs_table(runs: list[Run], *, width: int) -> Table:
    """Runs as a table that fits ``width``: run id, pipeline and status always whole."""
    summaries = [run.telemetry_summary for run in runs]
    columns: list[tuple[str, list[str | Text]]] = [
        ("run", [run.id for run in runs]),
        ("pipeline", [run.pipeline for run in runs]),
        ("status", [status_text(run.status) for run in runs]),
        ("took", [run_duration(run) for run in runs]),
        ("rows", [format_count(telemetry.counter(s, "rows_loaded")) for s in summaries]),
        ("progress", [f"{telemetry.progress(s):.0f}%" for s in summaries]),
        ("attempt", [str(run.attempt) for run in runs]),
        ("created", [run.created_at.astimezone().strftime("%Y-%m-%d %H:%M:%S") for run in runs]),
    ]
    return table(columns, width=width, keep=3, right=frozenset({"attempt", "progress", "rows"}))


def run_panel(run: Run) -> Table:
    """One run's details as a two-column grid; every value from the store as plain text."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    summary = run.telemetry_summary
    position = run.checkpoint.get("position") or {}
    rows: list[tuple[str, str | Text]] = [
        ("run", plain(run.id)),
        ("pipeline", plain(run.pipeline)),
        ("status", status_text(run.status)),
        ("started by", plain(origin_text(run))),
        ("attempt", attempt_text(run)),
        ("worker", plain(run.lease_owner or "-")),
        ("progress", f"{telemetry.progress(summary):.1f}%"),
        ("rows", format_count(telemetry.counter(summary, "rows_loaded"))),
        ("bytes", format_count(telemetry.counter(summary, "bytes_loaded"))),
        ("files", format_count(telemetry.counter(summary, "files_written"))),
        ("checkpoint", plain(json_text(position)) if position else "-"),
        ("created", run.created_at.isoformat()),
        (
            "took",
            f"{run_duration(run)} from its first start" if run.attempt > 1 else run_duration(run),
        ),
    ]
    if run.interval_start and run.interval_end:
        rows.append(
            ("interval", f"{run.interval_start.isoformat()} to {run.interval_end.isoformat()}")
        )
    if run.waiting_for and run.status is Status.QUEUED:
        rows.append(("waiting for", plain(f"{run.waiting_for} (max_active_runs)")))
    if run.not_before and run.status is Status.QUEUED:
        rows.append(("retry at", run.not_before.isoformat()))
    if run.gateway:
        rows.append(("gateway", plain(run.gateway)))
    if run.params:
        rows.append(("params", plain(json_text(run.params))))
    if run.error_summary:
        rows.append(("error", Text(escape_controls(run.error_summary), style="red")))
    for key, value in rows:
        grid.add_row(key, value)
    return grid


def origin_text(run: Run) -> str:
    """How a run started: ``manual by token:ci``, ``schedule, fired 2026-…``, ``backfill …``."""
    text = run.trigger
    if run.triggered_by:
        text += f" by {run.triggered_by}"
    if run.fire_time is not None:
        text += f", fire time {run.fire_time.isoformat()}"
    return text


def attempt_text(run: Run) -> str:
    """The attempt number, what the attempts after the first were, and why this one exists:
    ``3 (1 retry, 1 recovery); this one is a retry of attempt 2 (…)``."""
    text = wording.attempt_summary(run)
    if run.attempt_reason and run.attempt > 1:
        text += f"; this one is a {run.attempt_reason}"
    return text


def follow(
    store: Store,
    run_id: str,
    console: Console,
    *,
    min_level: Level | None = None,
    event: str | None = None,
    as_json: bool = False,
    follow: bool = True,
    show_progress: bool = True,
    alive: Callable[[], bool] = lambda: True,
) -> Run:
    """Print a run's entries from the start; with ``follow``, until the run ends.

    The entry id is the cursor, so nothing is printed twice or skipped. Returns
    the run as it was when following stopped.
    """
    cursor = 0
    use_bar = follow and show_progress and not as_json and console.is_terminal
    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[rows]} rows"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not use_bar,
    )
    task = bar.add_task(run_id, total=100, rows="0")
    with bar:
        while True:
            # Status first: entries committed with a terminal status are then visible below.
            run = store.get_run(run_id)
            while True:
                batch = store.entries(
                    run_id, after_id=cursor, limit=1000, min_level=min_level, event=event
                )
                for entry in batch:
                    if as_json:
                        console.print(
                            entry_json(entry), markup=False, highlight=False, soft_wrap=True
                        )
                    else:
                        console.print(entry_line(entry), soft_wrap=True)
                if batch:
                    cursor = batch[-1].id
                if len(batch) < 1000:
                    break
            summary = run.telemetry_summary
            resource = telemetry.label(summary, "current_resource") or run.status.value
            bar.update(
                task,
                completed=telemetry.progress(summary),
                rows=format_count(telemetry.counter(summary, "rows_loaded")),
                description=escape_controls(f"{run_id} {resource}"),
            )
            if not follow or run.status.terminal or not alive():
                return run
            time.sleep(POLL_SECONDS)
