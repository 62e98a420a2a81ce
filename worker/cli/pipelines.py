"""``quarry pipelines``: the pipelines file's pipelines, their schedules and state; pause and
resume."""

from __future__ import annotations

from typing import Annotated

import typer

from worker import control
from worker.cli import console as view
from worker.cli.common import open_store, out, print_json
from worker.cli.runs import cli_user
from worker.settings import get_settings

app = typer.Typer(
    rich_markup_mode=None,
    help="Pipelines declared in the pipelines file: list, pause and resume their schedules.",
    no_args_is_help=True,
)


@app.command("list")
def pipelines_list(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List the pipelines: schedule, next fire time, paused, active runs, last run's status."""
    views = control.pipelines_overview(open_store(), get_settings())
    rows = [v.as_dict() for v in views]
    if as_json:
        print_json(rows)
        return
    out.print(
        view.plain_table(
            (
                "pipeline",
                "schedule",
                "next fire",
                "active",
                "last",
                "source",
                "destination",
                "resources",
            ),
            [
                (
                    r["name"],
                    _schedule(r),
                    "paused" if r["paused"] else (r["next_fire"] or "-"),
                    f"{r['active_runs']}/{r['max_active_runs']}",
                    r["last_status"] or "-",
                    r["source"],
                    r["destination"],
                    ", ".join(_resource(x) for x in r["resources"]),
                )
                for r in rows
            ],
            width=out.width,
        )
    )


def _schedule(row: dict[str, object]) -> str:
    if not row["schedule"]:
        return "manual"
    zone = row["timezone"]
    return f"{row['schedule']}" + ("" if zone == "UTC" else f" ({zone})")


def _resource(resource: dict[str, object]) -> str:
    mode = resource["write_mode"]
    return str(resource["name"]) + ("" if mode == "append" else f" ({mode})")


def _pause(name: str, paused: bool, as_json: bool) -> None:
    settings = get_settings()
    store = open_store()
    control.set_paused(store, settings, name, paused, by=cli_user())
    row = control.pipelines_overview(store, settings, name)[0].as_dict()
    if as_json:
        print_json(row)
    elif paused:
        out.print(f"paused {name}: its schedule fires no run until resumed")
    else:
        upcoming = f"; next fire {row['next_fire']}" if row["next_fire"] else ""
        out.print(f"resumed {name}{upcoming}")


@app.command("pause")
def pipelines_pause(
    name: Annotated[str, typer.Argument(metavar="PIPELINE", help="Pipeline name.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Pause PIPELINE's schedule (runs already queued or running go on)."""
    _pause(name, True, as_json)


@app.command("resume")
def pipelines_resume(
    name: Annotated[str, typer.Argument(metavar="PIPELINE", help="Pipeline name.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Resume PIPELINE's schedule from now: intervals missed while paused never fire."""
    _pause(name, False, as_json)
