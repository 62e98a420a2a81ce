"""``quarry serve``: the HTTP API under uvicorn."""

from __future__ import annotations

from typing import Annotated

import typer

from worker.cli.common import open_store


def serve(
    host: Annotated[str, typer.Option(metavar="HOST", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[
        int, typer.Option(metavar="PORT", min=1, max=65535, help="Port to listen on.")
    ] = 8000,
) -> None:
    """Serve the HTTP API (uvicorn)."""
    import uvicorn

    from worker.api import create_app

    open_store().close()  # a missing schema fails here with a clear line
    uvicorn.run(create_app(), host=host, port=port, log_level="info", access_log=False)
