"""``quarry db``: the run-log store's schema."""

from __future__ import annotations

import typer

from worker.cli.common import (
    out,
    safe_url,
)
from worker.settings import get_settings
from worker.store import Store

app = typer.Typer(rich_markup_mode=None, help="The run-log store's schema.", no_args_is_help=True)


@app.command("upgrade")
def db_upgrade() -> None:
    """Create or migrate the store's tables (Alembic) to the newest schema."""
    store = Store(get_settings().store_url)
    store.upgrade()
    out.print(f"store at {safe_url(store.url)} is up to date")
