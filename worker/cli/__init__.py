"""``quarry``: trigger, list and inspect runs, read and follow their logs, run the demo.

One module per command group (``db``, ``pipelines``, ``runs``, ``logs``, ``tokens``,
``serve``, ``demo``); ``console`` renders what a person sees, ``client`` reads through
the HTTP API, ``common`` holds what they all share.
"""

from __future__ import annotations

import typer
from pydantic import ValidationError

from worker.cli import db, demo, logs, pipelines, runs, serve, tokens
from worker.cli.common import UsageError, fail, safe_url
from worker.errors import InvalidInput, QuarryError, StoreUnavailable
from worker.settings import get_settings

app = typer.Typer(
    rich_markup_mode=None,
    name="quarry",
    help="Quarry: SIGTERM-safe data-extraction runs on Celery.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(db.app, name="db")
app.add_typer(pipelines.app, name="pipelines")
app.add_typer(runs.app, name="runs")
app.add_typer(logs.app, name="logs")
app.add_typer(tokens.app, name="tokens")
app.command("serve")(serve.serve)
app.command("demo")(demo.demo)


def main() -> None:
    """Run the CLI; user errors print one line and exit non-zero, with no traceback."""
    try:
        app()
    except StoreUnavailable as exc:
        fail(f"cannot use the store at {safe_url(get_settings().store_url)}: {exc}")
    except QuarryError as exc:
        name = type(exc).__name__
        prefix = {"RunNotFound": "no such run: ", "UsageError": ""}.get(name, "")
        fail(prefix + str(exc), 2 if isinstance(exc, UsageError | InvalidInput) else 1)
    except ValidationError as exc:
        problems = "; ".join(
            f"QUARRY_{'_'.join(str(p) for p in e['loc']).upper()}: {e['msg']}" for e in exc.errors()
        )
        fail(f"invalid settings: {problems or exc}")
    except KeyboardInterrupt:
        raise SystemExit(130) from None


__all__ = ["app", "main"]
