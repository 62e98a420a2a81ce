"""The API application: lifespan, the request guard, error handlers, the OpenAPI document,
and one router per resource.

Every error is JSON: ``{"error": {"status": 404, "message": "…"}}``.
"""

from __future__ import annotations

import gc
import inspect
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import Scope

from worker import console
from worker.api import health, logs, metrics, pipelines, runs, stream
from worker.api.guard import Guard
from worker.api.responses import error, unavailable
from worker.errors import InvalidInput
from worker.limits import JSON_VALUE_SCHEMA
from worker.notify import Wakeups
from worker.runtime import open_store
from worker.scrub import describe
from worker.settings import Settings, get_settings
from worker.store.engine import unavailable_errors

_log = logging.getLogger("quarry.api")


#: FastAPI's own OpenTelemetry, switched off whatever the process's providers or
#: environment say: its logs record validation failures and exceptions with their
#: messages, unscrubbed, and its spans every request. Quarry's telemetry is its
#: Prometheus series and its scrubbed logs (``docs/metrics.md``).
_NO_FASTAPI_TELEMETRY = {
    "tracing": False,
    "metrics": False,
    "logs": False,
    "operation_spans": False,
    "auto_configure": False,
}


def _without_fastapi_telemetry() -> dict[str, Any]:
    """``FastAPI(...)`` options that keep its telemetry off, on versions that have it."""
    if "telemetry" in inspect.signature(FastAPI.__init__).parameters:
        return {"telemetry": _NO_FASTAPI_TELEMETRY}
    return {}


def create_app(settings: Settings | None = None) -> FastAPI:
    """The API application over the store named by ``settings``."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.settings = settings
        app.state.store = open_store(settings)
        app.state.wakeups = None
        if settings.notify_url:
            app.state.wakeups = Wakeups(settings.notify_url)
            await app.state.wakeups.start()
        app.state.feeds = stream.Feeds(app.state.store, app.state.wakeups)
        # Everything loaded so far lives as long as the process: out of the collector's
        # sight, a full collection no longer walks it (one stalls a page while it runs).
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            if app.state.wakeups is not None:
                await app.state.wakeups.stop()
            app.state.store.close()

    app = FastAPI(title="Quarry", version="1", lifespan=lifespan, **_without_fastapi_telemetry())
    app.add_middleware(Guard)
    _handle_errors(app)
    for module in (health, runs, pipelines, logs, metrics):
        app.include_router(module.router)
    console.mount(app)

    def openapi() -> dict[str, Any]:
        """FastAPI's document plus the JsonValue component that bounded JSON fields name."""
        if app.openapi_schema is None:
            document = get_openapi(
                title=app.title, version=app.version, routes=app.routes, summary=app.summary
            )
            document.setdefault("components", {}).setdefault("schemas", {})["JsonValue"] = (
                JSON_VALUE_SCHEMA
            )
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _handle_errors(app: FastAPI) -> None:
    """Every error as JSON: refused requests, bad input, store outages, bugs."""

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if console.wants_page(request) and exc.status_code != 405:
            return console.error_page(request, exc.status_code, str(exc.detail))
        response: Response = error(exc.status_code, str(exc.detail), exc.headers)
        if exc.status_code == 401:
            response.headers["WWW-Authenticate"] = "Bearer"
        if exc.status_code == 405:
            # Starlette names only the methods of the route it tried; list every route's.
            response.headers["Allow"] = ", ".join(_allowed_methods(app, request.scope))
        return response

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        unknown = sorted(
            str(e["loc"][-1])
            for e in errors
            if e["type"] == "extra_forbidden" and e["loc"][0] == "query"
        )
        if {"token", "access_token"} & set(unknown):
            return error(400, "tokens in URLs are refused: use the Authorization header")
        if unknown:
            return error(400, f"unknown query parameter(s): {', '.join(unknown)}")
        where = {"query", "path", "body", "header"}
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'] if p not in where) or 'body'}: {e['msg']}"
            for e in errors
        )
        # A malformed parameter is a bad request (400); a body that fails validation, 422.
        in_body = any(e["loc"][:1] == ("body",) for e in errors)
        return error(422 if in_body else 400, problems)

    async def _store_down(request: Request, exc: Exception) -> JSONResponse:
        # A known outage: one line, no traceback, and the client told when to retry.
        _log.error("%s %s: store unavailable: %s", request.method, request.url.path, describe(exc))
        return unavailable()

    for outage in unavailable_errors():
        app.add_exception_handler(outage, _store_down)

    @app.exception_handler(Exception)
    async def _bug(_request: Request, _exc: Exception) -> JSONResponse:
        # Starlette still logs the traceback after this answer: a bug must be seen.
        return error(500, "internal error")

    @app.exception_handler(InvalidInput)
    async def _out_of_bounds(_request: Request, exc: InvalidInput) -> JSONResponse:
        return error(422, str(exc))


def _allowed_methods(app: FastAPI, scope: Scope) -> list[str]:
    """Every method some route serves at the request's path."""
    methods: set[str] = set()
    for route in app.router.routes:
        if isinstance(route, APIRoute) and route.matches(scope)[0] is not Match.NONE:
            methods |= route.methods or set()
    return sorted(methods)
