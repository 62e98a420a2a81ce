"""``quarry runs``: trigger, list, show and cancel runs."""

from __future__ import annotations

import getpass
from datetime import datetime
from typing import Annotated, Any

import typer

from worker import control
from worker.cli import console as view
from worker.cli.common import (
    UsageError,
    err,
    open_store,
    out,
    parse_params,
    print_json,
)
from worker.models import Event, Status
from worker.publish import publish_run
from worker.settings import get_settings
from worker.store import Store
from worker.wording import plural

app = typer.Typer(
    rich_markup_mode=None, help="Trigger, list, show and cancel runs.", no_args_is_help=True
)


def cli_user() -> str:
    """Who runs a CLI command, as a run records it: ``cli:USER``."""
    try:
        return f"cli:{getpass.getuser()}"
    except (OSError, KeyError):  # no login name (a container without a passwd entry)
        return "cli"


def trigger_run(store: Store, pipeline: str, params: dict[str, Any]) -> str:
    """Create a queued run and publish it (see :func:`worker.control.trigger`)."""
    settings = get_settings()
    return control.trigger(
        store, settings, publish_run, pipeline, params, triggered_by=cli_user()
    ).id


@app.command("trigger")
def runs_trigger(
    pipeline: Annotated[str, typer.Argument(metavar="PIPELINE", help="Pipeline name.")],
    param: Annotated[
        list[str] | None,
        typer.Option("--param", "-p", metavar="KEY=VALUE", help="A run parameter (repeatable)."),
    ] = None,
    follow_: Annotated[bool, typer.Option("--follow", "-f", help="Follow the run's logs.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Queue a run of PIPELINE; with --follow, stream its logs until it ends."""
    params = parse_params(param or [])
    store = open_store()
    run_id = trigger_run(store, pipeline, params)
    for entry in store.entries(run_id, limit=10):
        if entry.event == Event.RUN_UNPUBLISHED:  # said on stderr: stdout stays the result
            err.print(f"warning: {entry.message}", markup=False)
    if not follow_:
        if as_json:
            print_json(store.get_run(run_id).as_dict())
        else:
            out.print(f"queued {run_id}")
        return
    if not as_json:
        err.print(f"queued {run_id}, following (Ctrl-C stops following, not the run)")
    run = view.follow(store, run_id, out, as_json=as_json)
    raise typer.Exit(0 if run.status is Status.SUCCEEDED else 1)


@app.command("cancel")
def runs_cancel(
    run_id: Annotated[str, typer.Argument(metavar="RUN", help="Run id.")],
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help=(
                "End a running run now, without waiting for a safe point: its worker's "
                "writes are refused from now on, and a worker stuck in a call is ended."
            ),
        ),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Cancel a run: at once if queued or interrupted, at its next heartbeat if running."""
    run = control.cancel(open_store(), run_id, force=force, by=cli_user())
    if as_json:
        print_json(run.as_dict())
    elif run.status is Status.CANCELLED:
        out.print(f"cancelled {run.id}" + (" by force" if force else ""))
    else:
        out.print(
            f"cancel requested for {run.id}; its worker stops at the next heartbeat "
            "(--force ends it now)"
        )


@app.command("backfill")
def runs_backfill(
    pipeline: Annotated[str, typer.Argument(metavar="PIPELINE", help="Pipeline name.")],
    start: Annotated[
        str,
        typer.Option(
            "--from", metavar="WHEN", help="Range start, ISO 8601 (UTC without an offset)."
        ),
    ],
    end: Annotated[
        str, typer.Option("--to", metavar="WHEN", help="Range end, ISO 8601 (UTC without one).")
    ],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Queue one run per schedule interval of PIPELINE within [--from, --to].

    Intervals that already have a run (an earlier backfill, the schedule's own run)
    are skipped, so repeating a backfill adds nothing.
    """
    done = control.backfill(
        open_store(),
        get_settings(),
        publish_run,
        pipeline,
        start=_when("--from", start),
        end=_when("--to", end),
        triggered_by=cli_user(),
    )
    if as_json:
        print_json(done.as_dict())
        return
    out.print(
        f"queued {plural(len(done.created), 'run')} for "
        f"{plural(done.intervals, 'interval')} of {pipeline}"
        + (f" ({done.existing:,} already had one)" if done.existing else "")
    )


def _when(option: str, value: str) -> datetime:
    try:
        return datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        msg = f"{option}: expected an ISO 8601 date or date-time, got {value!r}"
        raise UsageError(msg) from None


@app.command("list")
def runs_list(
    status: Annotated[
        str | None, typer.Option("--status", metavar="STATUS", help="Only runs in this status.")
    ] = None,
    pipeline: Annotated[
        str | None, typer.Option("--pipeline", metavar="PIPELINE", help="Only this pipeline.")
    ] = None,
    limit: Annotated[
        int, typer.Option("--limit", metavar="N", min=1, max=1000, help="At most this many.")
    ] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List runs, newest first."""
    wanted: Status | None = None
    if status is not None:
        try:
            wanted = Status(status.lower())
        except ValueError:
            known = ", ".join(s.value for s in Status)
            msg = f"--status: expected one of {known}; got {status!r}"
            raise UsageError(msg) from None
    runs = open_store().list_runs(status=wanted, pipeline=pipeline, limit=limit)
    if as_json:
        print_json([r.as_dict() for r in runs])
    elif runs:
        out.print(view.runs_table(runs, width=out.width))
    else:
        out.print("no runs")


@app.command("show")
def runs_show(
    run_id: Annotated[str, typer.Argument(metavar="RUN", help="Run id.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show one run: status, progress, checkpoint, error."""
    run = open_store().get_run(run_id)
    if as_json:
        print_json(run.as_dict())
    else:
        out.print(view.run_panel(run))
