"""The ``quarry`` CLI, run as a real subprocess: readable output, clear errors, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from typer.testing import CliRunner

from worker.cli import app
from worker.models import Level, NewEntry, Status
from worker.store import Store

QUARRY = Path(sys.executable).parent / "quarry"
PIPELINES = """
[pipelines.demo]
source = { type = "demo" }
resources = [{ name = "profiles" }]
"""


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """Environment for an embedded store in a temp dir."""
    (tmp_path / "pipelines.toml").write_text(PIPELINES)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("QUARRY_")}
    return {
        **clean,
        "QUARRY_DATA_DIR": str(tmp_path / "data"),
        "QUARRY_PIPELINES_FILE": str(tmp_path / "pipelines.toml"),
        "COLUMNS": "200",
    }


def quarry(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """Run the CLI."""
    return subprocess.run(
        [str(QUARRY), *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )


def seeded_store(env: dict[str, str]) -> tuple[Store, str]:
    """A store with one run and a few entries of each level."""
    store = Store(f"sqlite:///{Path(env['QUARRY_DATA_DIR']) / 'quarry.db'}")
    store.upgrade()
    run = store.create_run("demo")
    now = datetime.now(UTC)
    store.append_entries(
        [
            NewEntry(
                run.id,
                Level.INFO,
                "resource_started",
                "Extracting profiles (1/3)",
                now,
                {"resource": "profiles"},
            ),
            NewEntry(
                run.id,
                Level.WARNING,
                "run_interrupted",
                "SIGTERM received\n10:00:00 [info] forged",
                now,
            ),
            NewEntry(run.id, Level.ERROR, "run_failed", "Run failed: boom", now),
        ]
    )
    store.transition(run.id, Status.QUEUED, Status.CANCELLED)
    return store, run.id


def test_logs_print_like_the_docs_and_escape_newlines(env: dict[str, str]) -> None:
    """``quarry logs`` prints ``HH:MM:SS [level] event - message``; a newline cannot forge a line."""
    _, run_id = seeded_store(env)
    result = quarry(env, "logs", run_id)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 3
    assert lines[0][8:] == " [info] resource_started - Extracting profiles (1/3)"
    assert lines[1].endswith("run_interrupted - SIGTERM received\\n10:00:00 [info] forged")


def test_logs_level_and_json(env: dict[str, str]) -> None:
    """``--level warning`` keeps warnings and errors; ``--json`` prints one entry per line."""
    _, run_id = seeded_store(env)
    result = quarry(env, "logs", run_id, "--level", "warn", "--json")
    assert result.returncode == 0, result.stderr
    entries = [json.loads(line) for line in result.stdout.splitlines()]
    assert [e["event"] for e in entries] == ["run_interrupted", "run_failed"]
    assert set(entries[0]) == {
        "id",
        "run_id",
        "level",
        "event",
        "message",
        "data",
        "worker_id",
        "attempt",
        "occurred_at",
    }


def test_runs_list_and_show(env: dict[str, str]) -> None:
    """Runs list as a table and as JSON; show prints one run."""
    _, run_id = seeded_store(env)
    table = quarry(env, "runs", "list")
    assert run_id in table.stdout
    assert "cancelled" in table.stdout
    listed = json.loads(quarry(env, "runs", "list", "--status", "cancelled", "--json").stdout)
    assert [r["id"] for r in listed] == [run_id]
    shown = json.loads(quarry(env, "runs", "show", run_id, "--json").stdout)
    assert shown["status"] == "cancelled"


def test_pipelines_list(env: dict[str, str]) -> None:
    """Pipelines list names the pipeline, its source and resources."""
    result = quarry(env, "pipelines", "list", "--json")
    assert json.loads(result.stdout)[0]["name"] == "demo"


def test_pipelines_pause_resume_and_the_list_of_their_state(env: dict[str, str]) -> None:
    """Pause and resume are stored and shown; the list names the last run's status and the
    runs show how a run started."""
    Path(env["QUARRY_PIPELINES_FILE"]).write_text(
        PIPELINES + '\n[pipelines.hourly]\nsource = { type = "demo" }\n'
        'resources = [{ name = "profiles" }]\nschedule = "@hourly"\n'
    )
    store = Store(f"sqlite:///{Path(env['QUARRY_DATA_DIR']) / 'quarry.db'}")
    store.upgrade()
    older = store.create_run("hourly", triggered_by="cli:ann")
    store.transition(older.id, Status.QUEUED, Status.CANCELLED)
    newest = store.create_run("hourly", triggered_by="token:ci")

    paused = quarry(env, "pipelines", "pause", "hourly")
    assert paused.returncode == 0, paused.stderr
    assert "paused hourly: its schedule fires no run until resumed" in paused.stdout
    rows = {r["name"]: r for r in json.loads(quarry(env, "pipelines", "list", "--json").stdout)}
    assert rows["hourly"]["paused"] is True
    assert rows["hourly"]["paused_by"].startswith("cli:")
    assert rows["hourly"]["next_fire"] is None
    assert rows["hourly"]["last_status"] == "queued"
    assert rows["hourly"]["last_run"] == newest.id
    assert rows["hourly"]["recent_statuses"] == ["queued", "cancelled"]
    assert rows["demo"]["last_status"] is None and rows["demo"]["schedule"] is None
    assert "paused" in quarry(env, "pipelines", "list").stdout

    resumed = json.loads(quarry(env, "pipelines", "resume", "hourly", "--json").stdout)
    assert resumed["paused"] is False and resumed["next_fire"] is not None
    assert store.pipeline_states(["hourly"])["hourly"].paused is False

    unknown = quarry(env, "pipelines", "pause", "nope", "--json")
    assert unknown.returncode == 1
    error = json.loads(unknown.stdout or unknown.stderr)["error"]
    assert "unknown pipeline 'nope'" in error["message"]

    shown = quarry(env, "runs", "show", older.id)
    assert "manual by cli:ann" in shown.stdout
    assert json.loads(quarry(env, "runs", "show", newest.id, "--json").stdout)["triggered_by"] == (
        "token:ci"
    )
    store.close()


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (("runs", "show", "run_nope"), 1, "no such run: run_nope"),
        (("logs", "run_nope"), 1, "no such run: run_nope"),
        (("runs", "trigger", "nope"), 1, "unknown pipeline 'nope'"),
        (("runs", "trigger", "demo", "--param", "novalue"), 2, "--param: expected KEY=VALUE"),
        (("runs", "list", "--status", "weird"), 2, "--status: expected one of"),
        (("logs", "x", "--level", "loud"), 2, "--level: expected one of"),
    ],
)
def test_user_errors_are_one_clear_line(
    env: dict[str, str], args: tuple[str, ...], code: int, needle: str
) -> None:
    """User errors name the field, exit non-zero, and print no traceback."""
    seeded_store(env)
    result = quarry(env, *args)
    assert result.returncode == code
    assert needle in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_malformed_pipelines_file(env: dict[str, str], tmp_path: Path) -> None:
    """A broken pipelines file is reported with its path and the field."""
    (tmp_path / "pipelines.toml").write_text(
        "[pipelines.demo]\nsource = { type = 'demo' }\nresources = [{ nam = 'x' }]\n"
    )
    result = quarry(env, "pipelines", "list")
    assert result.returncode == 1
    assert "pipelines.toml: pipeline 'demo': resources.0.name: Field required" in result.stderr
    assert "Traceback" not in result.stderr


def test_unreachable_database_is_reported_without_its_password(env: dict[str, str]) -> None:
    """An unreachable store gives one line, with the DSN's password scrubbed."""
    env = {
        **env,
        "QUARRY_DATABASE_URL": "postgresql+psycopg://quarry:pw-canary-77@127.0.0.1:1/quarry",
    }
    result = quarry(env, "runs", "list")
    assert result.returncode == 1
    assert "cannot use the store" in result.stderr
    assert "pw-canary-77" not in result.stderr + result.stdout
    assert "Traceback" not in result.stderr


def test_unreachable_broker_keeps_the_run_queued_for_the_watchdog(env: dict[str, str]) -> None:
    """If the broker cannot take the message, the run stays stored and queued, with a warning
    that says so (scrubbed); the watchdog publishes it once the broker is back."""
    store, _ = seeded_store(env)
    env = {**env, "QUARRY_BROKER_URL": "redis://:pw-canary-88@127.0.0.1:1/0"}
    result = quarry(env, "runs", "trigger", "demo")
    assert result.returncode == 0, result.stderr
    assert "pw-canary-88" not in result.stderr + result.stdout
    assert "Traceback" not in result.stderr
    newest = store.list_runs(limit=1)[0]
    assert newest.status is Status.QUEUED
    (warning,) = [e for e in store.entries(newest.id) if e.event == "run_unpublished"]
    assert warning.message.startswith("The broker is unreachable (")
    assert "pw-canary-88" not in warning.message


def test_invalid_setting_names_the_variable(env: dict[str, str]) -> None:
    """A bad QUARRY_* value names the variable."""
    result = quarry({**env, "QUARRY_LEASE_TTL_SECONDS": "soon"}, "runs", "list")
    assert result.returncode == 1
    assert "QUARRY_LEASE_TTL_SECONDS" in result.stderr


def test_cancel_a_queued_run_then_refuse_a_second_cancel(env: dict[str, str]) -> None:
    """``runs cancel`` ends a queued run at once; cancelling an ended run is a clear error."""
    store, _ = seeded_store(env)
    run = store.create_run("demo")
    result = quarry(env, "runs", "cancel", run.id)
    assert result.returncode == 0, result.stderr
    assert f"cancelled {run.id}" in result.stdout
    assert store.get_run(run.id).status is Status.CANCELLED
    again = quarry(env, "runs", "cancel", run.id)
    assert again.returncode == 1
    assert "already ended (cancelled)" in again.stderr


def test_logs_export_writes_every_entry_as_jsonl(env: dict[str, str], tmp_path: Path) -> None:
    """``logs export RUN -o FILE`` writes one JSON entry per line, all of them."""
    _, run_id = seeded_store(env)
    target = tmp_path / "export.jsonl"
    result = quarry(env, "logs", "export", run_id, "-o", str(target))
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in target.read_text().splitlines()]
    assert [e["event"] for e in lines] == ["resource_started", "run_interrupted", "run_failed"]
    assert "wrote 3 entries" in result.stderr


def test_unreachable_broker_with_webhooks_is_one_line(env: dict[str, str]) -> None:
    """With webhooks configured, a failed publish still prints one warning line, no traceback."""
    seeded_store(env)
    env = {
        **env,
        "QUARRY_BROKER_URL": "redis://:pw-canary-89@127.0.0.1:1/0",
        "QUARRY_WEBHOOK_URLS": "http://127.0.0.1:1/hook",
    }
    result = quarry(env, "runs", "trigger", "demo")
    assert result.returncode == 0
    assert "Traceback" not in result.stderr
    assert "pw-canary-89" not in result.stderr + result.stdout
    assert len(result.stderr.strip().splitlines()) <= 3, result.stderr
    assert "warning: The broker is unreachable (" in result.stderr


def test_store_values_print_as_plain_text(env: dict[str, str]) -> None:
    """Markup, hyperlinks and terminal controls in stored values print inert; JSON escapes them."""
    store, _ = seeded_store(env)
    hostile = {
        "label": "[/oops]",
        "link": "[link=http://evil.example]click[/link]",
        "bidi": "abc\u202edcba",
        "csi": "x\x9b31my",
        "sep": "a\u2028b\u2029c\x85d",
    }
    run = store.create_run("demo", hostile)
    now = datetime.now(UTC)
    store.append_entries(
        [NewEntry(run.id, Level.INFO, "log", "m\u2028[bold]x[/bold]\x9b", now, hostile)]
    )
    shown = quarry(env, "runs", "show", run.id)
    assert shown.returncode == 0, shown.stderr
    assert "[/oops]" in shown.stdout
    assert "[link=http://evil.example]" in shown.stdout
    assert "\x1b]8;" not in shown.stdout  # no terminal hyperlink
    listed = quarry(env, "runs", "list")
    assert listed.returncode == 0, listed.stderr
    for args in (
        ("logs", run.id, "--json"),
        ("logs", "export", run.id),
        ("runs", "show", run.id, "--json"),
    ):
        result = quarry(env, *args)
        assert result.returncode == 0, result.stderr
        for char in ("\u2028", "\u2029", "\x85", "\x9b", "\u202e"):
            assert char not in result.stdout, (args, repr(char))
        for line in result.stdout.splitlines():
            json.loads(line)


def test_junk_telemetry_renders(env: dict[str, str]) -> None:
    """A stored summary with wrong types (written before validation) never breaks a command."""
    store, _ = seeded_store(env)
    run = store.create_run("demo")
    lease = store.acquire(run.id, "w", 30)
    assert lease is not None
    store.renew(
        lease,
        30,
        {"progress": "abc", "rows_loaded": "many", "bytes_loaded": None, "current_resource": 5},
    )
    for args in (("runs", "list"), ("runs", "show", run.id), ("logs", run.id)):
        result = quarry(env, *args)
        assert result.returncode == 0, (args, result.stderr)
        assert "Traceback" not in result.stderr


def test_params_are_bounded_and_scrubbed_on_trigger(env: dict[str, str]) -> None:
    """A --param nested too deep is a usage error naming it; a secret param is never stored."""
    store, _ = seeded_store(env)
    deep = "[" * 40 + "]" * 40
    result = quarry(env, "runs", "trigger", "demo", "--param", f"x={deep}")
    assert result.returncode != 0
    assert "params.x" in result.stderr
    assert "Traceback" not in result.stderr
    assert len(store.list_runs()) == 1


def test_errors_are_one_line_when_narrow_and_json_with_json(env: dict[str, str]) -> None:
    """A long error stays on one line in a narrow pipe; with --json it is a JSON object."""
    seeded_store(env)
    narrow = {**env, "COLUMNS": "40"}
    result = quarry(narrow, "runs", "trigger", "a-pipeline-name-that-is-long-enough-to-wrap")
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    for args in (("runs", "cancel", "run_nope", "--json"), ("runs", "show", "run_nope", "--json")):
        failed = quarry(narrow, *args)
        assert failed.returncode == 1
        assert failed.stdout == ""
        assert json.loads(failed.stderr) == {
            "error": {"message": "no such run: run_nope", "exit_code": 1}
        }


def test_help_shows_plain_placeholders() -> None:
    """Every command's help names values plainly (KEY=VALUE, RUN), never <bool> or <list[str]>.

    Help is rendered in this process (typer's runner): it is the same code the ``quarry``
    command runs, and a process per command cost most of this tier's time."""
    runner = CliRunner()
    commands = [(), ("runs",), ("runs", "trigger"), ("runs", "list"), ("logs", "show")]
    commands += [("logs", "export"), ("tokens", "create"), ("serve",), ("demo",), ("db", "upgrade")]
    commands += [("runs", "backfill"), ("runs", "cancel"), ("pipelines", "pause")]
    for command in commands:
        result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "120"})
        assert result.exit_code == 0, (command, result.output)
        assert "<bool>" not in result.output
        assert "<list" not in result.output
    assert "--param KEY=VALUE" in runner.invoke(app, ["runs", "trigger", "--help"]).output
    # And the installed command renders the same help.
    assert "--param KEY=VALUE" in quarry(env_for_help(), "runs", "trigger", "--help").stdout


def env_for_help() -> dict[str, str]:
    return {**os.environ, "COLUMNS": "120"}


def test_tables_keep_ids_whole_at_80_columns(env: dict[str, str]) -> None:
    """At 80 columns a run id and a token id print whole; lesser columns give way."""
    store, run_id = seeded_store(env)
    token, _ = store.create_token("gateway:a-rather-long-gateway-name", "a label for people")
    narrow = {**env, "COLUMNS": "80"}
    runs = quarry(narrow, "runs", "list")
    assert run_id in runs.stdout
    assert all(len(line) <= 80 for line in runs.stdout.splitlines())
    tokens = quarry(narrow, "tokens", "list")
    assert token.id in tokens.stdout
    assert all(len(line) <= 80 for line in tokens.stdout.splitlines())


def test_db_upgrade_says_what_it_did(env: dict[str, str]) -> None:
    """On an empty database it says it created the tables; again, that it was current."""
    created = quarry(env, "db", "upgrade")
    assert created.returncode == 0
    assert "created the store's tables" in created.stdout
    again = quarry(env, "db", "upgrade")
    assert "already at the newest schema" in again.stdout
