"""``quarry pipelines``: the pipelines declared in the pipelines file."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from worker.cli import console as view
from worker.cli.common import (
    out,
    print_json,
)
from worker.pipelines import load_pipelines, plan_slices
from worker.settings import get_settings

app = typer.Typer(
    rich_markup_mode=None, help="Pipelines declared in the pipelines file.", no_args_is_help=True
)


@app.command("list")
def pipelines_list(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List the pipelines in the pipelines file."""
    settings = get_settings()
    pipelines = load_pipelines(settings.pipelines_file)
    rows: list[dict[str, Any]] = []
    for pipeline in pipelines.values():
        resources_ = [
            f"{r.name} ({len(plan_slices(r.slices))} slices)" if r.slices else r.name
            for r in pipeline.resources
        ]
        rows.append(
            {
                "name": pipeline.name,
                "source": pipeline.source.type,
                "destination": pipeline.destination.type,
                "resources": resources_,
                "description": pipeline.description,
            }
        )
    if as_json:
        print_json(rows)
        return
    out.print(
        view.plain_table(
            ("pipeline", "source", "destination", "resources", "description"),
            [
                (
                    r["name"],
                    r["source"],
                    r["destination"],
                    ", ".join(r["resources"]),
                    r["description"],
                )
                for r in rows
            ],
            width=out.width,
        )
    )
