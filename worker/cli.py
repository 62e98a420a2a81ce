"""``quarry``: trigger, list and inspect runs, read and follow their logs, run the demo."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, NoReturn

import httpx
import typer
from pydantic import ValidationError
from rich.console import Console
from typer.core import TyperGroup

from worker import console as view
from worker import control, runtime
from worker.client import ApiClient
from worker.errors import ConfigError, InvalidInput, QuarryError, first_line
from worker.models import Entry, Level, Status
from worker.pipelines import load_pipelines, plan_slices
from worker.runlog import escape_controls
from worker.scrub import scrubber
from worker.settings import Settings, get_settings
from worker.store import Store

app = typer.Typer(
    name="quarry",
    help="Quarry: SIGTERM-safe data-extraction runs on Celery.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
db_app = typer.Typer(help="The run-log store's schema.", no_args_is_help=True)
pipelines_app = typer.Typer(help="Pipelines declared in the pipelines file.", no_args_is_help=True)
runs_app = typer.Typer(help="Trigger, list, show and cancel runs.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(pipelines_app, name="pipelines")
app.add_typer(runs_app, name="runs")
tokens_app = typer.Typer(
    help="API tokens (stored hashed; the secret is shown once).", no_args_is_help=True
)
app.add_typer(tokens_app, name="tokens")

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


class UsageError(QuarryError):
    """The command line itself is wrong; the message names the option."""


def fail(message: str, code: int = 1) -> NoReturn:
    """Print a scrubbed error and exit non-zero."""
    err.print("[bold red]error:[/] ", end="")
    err.print(escape_controls(scrubber.text(message)), markup=False)
    raise SystemExit(code)


def print_json(value: Any) -> None:
    """Print ``value`` as JSON, terminal-safe (:func:`worker.console.json_text`), never markup."""
    out.print(view.json_text(value), markup=False, highlight=False, soft_wrap=True)


def open_store(settings: Settings | None = None) -> Store:
    """The store, with a clear error when its schema was never created."""
    settings = settings or get_settings()
    store = runtime.open_store(settings)
    if not store.schema_is_current():
        if settings.embedded:
            store.upgrade()
        else:
            fail("the store's schema is not current: run `quarry db upgrade`")
    return store


def parse_params(pairs: list[str]) -> dict[str, Any]:
    """``k=v`` pairs; values are read as JSON when they parse (numbers, true, lists)."""
    params: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            msg = f"--param: expected KEY=VALUE, got {pair!r}"
            raise UsageError(msg)
        try:
            params[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            params[key.strip()] = raw
    return params


def parse_level(value: str | None) -> Level | None:
    """A ``--level`` value, or a usage error naming the option."""
    if value is None:
        return None
    try:
        return Level.parse(value)
    except ValueError:
        msg = f"--level: expected one of debug, info, warning, error; got {value!r}"
        raise UsageError(msg) from None


# -- db -----------------------------------------------------------------------


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Create or migrate the store's tables (Alembic) to the newest schema."""
    store = Store(get_settings().store_url)
    store.upgrade()
    out.print(f"store at {_safe_url(store.url)} is up to date")


def _safe_url(url: str) -> str:
    return scrubber.text(url)


# -- pipelines ----------------------------------------------------------------


@pipelines_app.command("list")
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
        )
    )


# -- runs ---------------------------------------------------------------------


def trigger_run(store: Store, pipeline: str, params: dict[str, Any]) -> str:
    """Create a queued run and publish it (see :func:`worker.control.trigger`)."""
    from worker.publish import publish_run

    return control.trigger(store, get_settings(), publish_run, pipeline, params).id


@runs_app.command("trigger")
def runs_trigger(
    pipeline: Annotated[str, typer.Argument(help="Pipeline name.")],
    param: Annotated[
        list[str] | None, typer.Option("--param", "-p", help="KEY=VALUE run parameter.")
    ] = None,
    follow_: Annotated[bool, typer.Option("--follow", "-f", help="Follow the run's logs.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Queue a run of PIPELINE; with --follow, stream its logs until it ends."""
    params = parse_params(param or [])
    store = open_store()
    run_id = trigger_run(store, pipeline, params)
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


@runs_app.command("cancel")
def runs_cancel(
    run_id: Annotated[str, typer.Argument(metavar="RUN", help="Run id.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Cancel a run: at once if queued or interrupted, at its next heartbeat if running."""
    run = control.cancel(open_store(), run_id)
    if as_json:
        print_json(run.as_dict())
    elif run.status is Status.CANCELLED:
        out.print(f"cancelled {run.id}")
    else:
        out.print(f"cancel requested for {run.id}; its worker stops at the next heartbeat")


@runs_app.command("list")
def runs_list(
    status: Annotated[
        str | None, typer.Option("--status", help="Only runs in this status.")
    ] = None,
    pipeline: Annotated[str | None, typer.Option("--pipeline", help="Only this pipeline.")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=1000, help="At most this many.")] = 50,
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
        out.print(view.runs_table(runs))
    else:
        out.print("no runs")


@runs_app.command("show")
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


# -- logs ---------------------------------------------------------------------


class _DefaultToShow(TyperGroup):
    """``quarry logs RUN`` means ``quarry logs show RUN``; ``quarry logs export RUN`` exports."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        """Route anything that is not a subcommand (or --help) to ``show``."""
        if args and args[0] not in self.commands and args[0] not in {"--help", "-h"}:
            args = ["show", *args]
        return super().parse_args(ctx, args)


logs_app = typer.Typer(
    cls=_DefaultToShow, help="Read, follow and export a run's log.", no_args_is_help=True
)
app.add_typer(logs_app, name="logs")


@logs_app.command("show")
def logs(  # noqa: PLR0917 - typer reads the options from the signature
    run_id: Annotated[str, typer.Argument(metavar="RUN", help="Run id.")],
    level: Annotated[
        str | None,
        typer.Option(
            "--level", help="Minimum level: info, warning (= warnings and errors), error."
        ),
    ] = None,
    event: Annotated[str | None, typer.Option("--event", help="Only this event.")] = None,
    follow_: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing until the run ends.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON entry per line.")] = False,
    api: Annotated[
        str | None,
        typer.Option("--api", help="Read through this Quarry API (default: QUARRY_API_URL)."),
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


# -- API and tokens ---------------------------------------------------------------


@app.command("serve")
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8000,
) -> None:
    """Serve the HTTP API (uvicorn)."""
    import uvicorn

    from worker.api import create_app

    open_store().close()  # a missing schema fails here with a clear line
    uvicorn.run(create_app(), host=host, port=port, log_level="info", access_log=False)


_SCOPE_HELP = "operator, read, or gateway:NAME"


def _check_scope(scope: str) -> str:
    if scope in {"operator", "read"} or (
        scope.startswith("gateway:") and len(scope) > len("gateway:")
    ):
        return scope
    msg = f"--scope: expected {_SCOPE_HELP}; got {scope!r}"
    raise UsageError(msg)


@tokens_app.command("create")
def tokens_create(
    scope: Annotated[str, typer.Option(help=_SCOPE_HELP)],
    name: Annotated[str, typer.Option(help="A label for people.")] = "",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Create a token and print its secret (once: only its hash is stored)."""
    token, secret = open_store().create_token(_check_scope(scope), name)
    if as_json:
        record = {"id": token.id, "scope": token.scope, "name": token.name, "token": secret}
        print(json.dumps(record))  # noqa: T201 - the one place a secret is meant for stdout
        return
    err.print(f"created {token.id} ({token.scope}); the secret below is shown only now:")
    print(secret)  # noqa: T201 - the one place a secret is meant for stdout


@tokens_app.command("list")
def tokens_list(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List tokens (never their secrets)."""
    tokens = open_store().list_tokens()
    rows: list[dict[str, Any]] = [
        {
            "id": t.id,
            "name": t.name,
            "scope": t.scope,
            "created_at": t.created_at.isoformat(),
            "revoked_at": t.revoked_at.isoformat() if t.revoked_at else None,
        }
        for t in tokens
    ]
    if as_json:
        print_json(rows)
        return
    out.print(
        view.plain_table(
            ("id", "name", "scope", "created", "revoked"),
            [
                (r["id"], str(r["name"]), r["scope"], r["created_at"], r["revoked_at"] or "-")
                for r in rows
            ],
        )
    )


@tokens_app.command("revoke")
def tokens_revoke(token_id: Annotated[str, typer.Argument(metavar="TOKEN_ID")]) -> None:
    """Revoke a token; it stops working at once."""
    if not open_store().revoke_token(token_id):
        fail(f"no live token {token_id}")
    out.print(f"revoked {token_id}")


@logs_app.command("export")
def logs_export(
    run_id: Annotated[str, typer.Argument(metavar="RUN", help="Run id.")],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="File (default: stdout).")
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


# -- demo ---------------------------------------------------------------------


def _demo_pipelines(settings: Settings) -> Path:
    """The configured pipelines file if it declares ``demo``, else the packaged one."""
    try:
        if "demo" in load_pipelines(settings.pipelines_file):
            return settings.pipelines_file
    except ConfigError:
        pass
    return Path(str(resources.files("worker") / "demo_pipelines.toml"))


@app.command("demo")
def demo(
    timeout: Annotated[float, typer.Option(help="Give up after this many seconds.")] = 300.0,
) -> None:
    """Run the demo pipeline on a real worker process and follow it live."""
    from worker.runtime import prepare_store

    settings = get_settings()
    pipelines_file = _demo_pipelines(settings).resolve()
    env = {**os.environ, "QUARRY_PIPELINES_FILE": str(pipelines_file)}
    os.environ["QUARRY_PIPELINES_FILE"] = str(pipelines_file)
    get_settings.cache_clear()
    settings = get_settings()
    prepare_store()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    worker_log = settings.data_dir / "demo-worker.log"
    err.print(f"starting a worker (celery -A worker worker), its log: {worker_log}")
    with worker_log.open("ab") as sink:
        worker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "worker",
                "worker",
                "--concurrency",
                "1",
                "--loglevel",
                "warning",
                "--hostname",
                f"quarry-demo-{os.getpid()}@%h",
            ],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        store = open_store(settings)
        run_id = trigger_run(store, "demo", {})
        err.print(f"triggered run {run_id} of pipeline 'demo'")
        deadline = time.monotonic() + timeout
        run = view.follow(
            store,
            run_id,
            out,
            alive=lambda: worker.poll() is None and time.monotonic() < deadline,
        )
    finally:
        _stop_worker(worker)
    if run.status is Status.SUCCEEDED:
        summary = run.telemetry_summary
        where = settings.files_root / "demo" / run_id
        out.print(
            f"\n[bold green]demo succeeded[/]: {int(summary.get('rows_loaded', 0)):,} rows in "
            f"{int(summary.get('files_written', 0)):,} files under {where}"
        )
        return
    if worker.returncode not in (None, 0, -signal.SIGTERM):
        fail(f"the worker exited with {worker.returncode}; see {worker_log}")
    fail(f"demo run {run_id} ended {run.status.value}: {run.error_summary or 'see its logs'}")


def _stop_worker(worker: subprocess.Popen[bytes]) -> None:
    """Warm-stop the worker with SIGTERM, as a deploy would; kill it if it hangs."""
    if worker.poll() is not None:
        return
    worker.send_signal(signal.SIGTERM)
    try:
        worker.wait(timeout=30)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait()


# -- entry point ----------------------------------------------------------------


def main() -> None:
    """Run the CLI; user errors print one line and exit non-zero, with no traceback."""
    try:
        app()
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
    except Exception as exc:
        if type(exc).__module__.split(".")[0] in {"sqlalchemy", "psycopg", "sqlite3"}:
            fail(
                f"cannot use the store at {_safe_url(get_settings().store_url)}: {_first_line(exc)}"
            )
        raise


def _first_line(exc: BaseException) -> str:
    return scrubber.text(first_line(exc))


if __name__ == "__main__":
    main()
