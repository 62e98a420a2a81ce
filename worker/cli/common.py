"""What every command shares: the consoles, one-line errors, the store, option parsing."""

from __future__ import annotations

import json
import sys
from typing import Any, NoReturn

from rich.console import Console
from rich.text import Text

from worker import runtime
from worker.cli import console as view
from worker.errors import QuarryError
from worker.models import Level
from worker.runlog import escape_controls
from worker.scrub import scrubber
from worker.settings import Settings, get_settings
from worker.store import Store

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


class UsageError(QuarryError):
    """The command line itself is wrong; the message names the option."""


def fail(message: str, code: int = 1) -> NoReturn:
    """Print a scrubbed error on one line of stderr and exit non-zero.

    With ``--json`` on the command line the error is JSON too,
    ``{"error": {"message": …, "exit_code": N}}``, so a script parses every outcome.
    """
    text = scrubber.text(message)
    if "--json" in sys.argv[1:]:
        sys.stderr.write(view.json_text({"error": {"message": text, "exit_code": code}}) + "\n")
    else:
        # soft_wrap: one line however narrow the terminal, or the pipe, is.
        err.print(Text.assemble(("error:", "bold red"), " ", escape_controls(text)), soft_wrap=True)
    raise SystemExit(code)


def print_json(value: Any) -> None:
    """``value`` as JSON, terminal-safe (:func:`worker.cli.console.json_text`), never markup."""
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


def safe_url(url: str) -> str:
    return scrubber.text(url)
