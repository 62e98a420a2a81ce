"""The web console, served by ``quarry serve`` at ``/`` beside the API (same process).

Pages are rendered on the server (Jinja2, autoescaped) from the store the API reads;
htmx refreshes their live parts, and ``static/console.js`` runs the log view and
the sparklines on the API's own routes, signed in by a session cookie. Front-end
files are vendored with pinned versions (:mod:`worker.console.vendor`); nothing
needs Node.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

from worker.console.pages import SECURITY_HEADERS, error_page, router
from worker.console.session import SignInRequired, sign_in_location

STATIC = Path(__file__).parent / "static"


class _Static(StaticFiles):
    """The console's files, with the same hardening headers as its pages."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Cache-Control"] = "no-cache"
        return response


def wants_page(request: Request) -> bool:
    """Whether an error on this request should be a console page rather than API JSON."""
    path = request.url.path
    return not (path.startswith("/api/") or path in {"/metrics", "/healthz", "/readyz"})


def mount(app: FastAPI) -> None:
    """Serve the console's pages, fragments and files on ``app``."""
    app.include_router(router)
    app.mount("/static", _Static(directory=STATIC), name="static")

    @app.exception_handler(SignInRequired)
    async def _sign_in(request: Request, _exc: SignInRequired) -> Response:
        if request.headers.get("hx-request"):
            # A live fragment of a page whose session ended: htmx follows HX-Redirect.
            response = Response(status_code=401, headers={"HX-Redirect": "/signin"})
        else:
            response = Response(status_code=303, headers={"Location": sign_in_location(request)})
        response.headers.update(SECURITY_HEADERS)
        return response


__all__ = ["error_page", "mount", "wants_page"]
