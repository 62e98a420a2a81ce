"""``quarry logs``: read, follow and export a run's log, from the store or through the API."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from typer.core import TyperGroup

from worker.cli import console as view
from worker.cli.client import ApiClient
from worker.cli.common import (
    err,
    open_store,
    out,
    parse_level,
)
from worker.errors import QuarryError
from worker.models import Entry, Level
from worker.settings import get_settings


class _DefaultToShow(TyperGroup):
    """``quarry logs RUN`` means ``quarry logs show RUN``; ``quarry logs export RUN`` exports."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        """Route anything that is not a subcommand (or --help) to ``show``."""
        if args and args[0] not in self.commands and args[0] not in {"--help", "-h"}:
            args = ["show", *args]
        return super().parse_args(ctx, args)


app = typer.Typer(
    rich_markup_mode=None,
    cls=_DefaultToShow,
    help="Read, follow and export a run's log.",
    no_args_is_help=True,
)


@app.command("show")
def logs(  # noqa: PLR0917 - typer reads the options from the signature
    run_id: Annotated[str, typer.Argument(metavar="RUN", help="Run id.")],
    level: Annotated[
        str | None,
        typer.Option(
            "--level",
            metavar="LEVEL",
            help="Minimum level: info, warning (= warnings and errors), error.",
        ),
    ] = None,
    event: Annotated[
        str | None, typer.Option("--event", metavar="EVENT", help="Only this event.")
    ] = None,
    follow_: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing until the run ends.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON entry per line.")] = False,
    api: Annotated[
        str | None,
        typer.Option(
            "--api", metavar="URL", help="Read through this Quarry API (default: QUARRY_API_URL)."
        ),
    ] = None,
) -> None:
    """Print a run's log entries, oldest first; the same output from the store or the API."""
    min_level = parse_level(level)
    settings = get_settings()
    api_url = api or settings.api_url
    if api_url:
        token = settings.api_token.get_secret_value()
        _logs_through_api(
            api_url,
            token,
            run_id,
            min_level=min_level,
            event=event,
            follow_=follow_,
            as_json=as_json,
        )
        return
    store = open_store()
    store.get_run(run_id)
    view.follow(
        store, run_id, out, min_level=min_level, event=event, as_json=as_json, follow=follow_
    )


def _logs_through_api(
    url: str,
    token: str,
    run_id: str,
    *,
    min_level: Level | None,
    event: str | None,
    follow_: bool,
    as_json: bool,
) -> None:
    """``quarry logs`` over HTTP: pages, or the SSE stream with ``--follow``."""
    client = ApiClient(url, token)
    try:
        wanted: Iterator[Entry]
        if follow_:
            wanted = (
                e for e in client.stream(run_id)
                if (min_level is None or e.level.rank >= min_level.rank)
                and (event is None or e.event == event)
            )  # fmt: skip
        else:
            wanted = client.entries(run_id, level=min_level, event=event)
        for entry in wanted:
            if as_json:
                out.print(view.entry_json(entry), markup=False, highlight=False, soft_wrap=True)
            else:
                out.print(view.entry_line(entry), soft_wrap=True)
    except httpx.HTTPError as exc:
        msg = f"cannot reach the API at {url}: {type(exc).__name__}"
        raise QuarryError(msg) from None
    finally:
        client.close()


@app.command("export")
def logs_export(
    run_id: Annotated[str, typer.Argument(metavar="RUN", help="Run id.")],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", metavar="FILE", help="File (default: stdout).")
    ] = None,
) -> None:
    """Write every entry of a run as JSON lines, for keeping past the retention period."""
    store = open_store()
    store.get_run(run_id)
    sink = output.open("w", encoding="utf-8") if output else sys.stdout
    cursor, count = 0, 0
    try:
        while batch := store.entries(run_id, after_id=cursor, limit=1000):
            sink.writelines(view.entry_json(entry) + "\n" for entry in batch)
            cursor, count = batch[-1].id, count + len(batch)
    finally:
        if output:
            sink.close()
    if output:
        err.print(f"wrote {count} entries to {output}")
