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
    before, after = store.upgrade()
    where = safe_url(store.url)
    if before is None:
        out.print(f"created the store's tables at {where} (schema {after})", markup=False)
    elif before != after:
        out.print(f"migrated the store at {where} from schema {before} to {after}", markup=False)
    else:
        out.print(f"the store at {where} is already at the newest schema ({after})", markup=False)
