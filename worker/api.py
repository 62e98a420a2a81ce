"""The HTTP API (FastAPI): runs and their logs over the store, behind bearer tokens.

Every error is JSON: ``{"error": {"status": 404, "message": "…"}}``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from worker import console
from worker.errors import RunNotFound
from worker.models import Level, Run, Status
from worker.scrub import scrubber
from worker.settings import Settings, get_settings
from worker.store import Store
from worker.store.tokens import Token

#: Most entries one page of logs returns.
MAX_PAGE = 1000

_bearer = HTTPBearer(auto_error=False)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse(
        {"error": {"status": status, "message": scrubber.text(message)}}, status_code=status
    )


def _store(request: Request) -> Store:
    return request.app.state.store  # type: ignore[no-any-return]


StoreDep = Annotated[Store, Depends(_store)]


def _authenticated(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Token:
    if request.query_params.get("token") or request.query_params.get("access_token"):
        raise HTTPException(400, "tokens in URLs are refused: use the Authorization header")
    if credentials is None:
        raise HTTPException(401, "missing bearer token")
    token = _store(request).verify_token(credentials.credentials)
    if token is None:
        raise HTTPException(401, "invalid or revoked token")
    return token


TokenDep = Annotated[Token, Depends(_authenticated)]


def create_app(settings: Settings | None = None) -> FastAPI:  # noqa: PLR0915 - routes read best together
    """The API application over the store named by ``settings``."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.store = Store(settings.store_url)
        try:
            yield
        finally:
            app.state.store.close()

    app = FastAPI(title="Quarry", version="1", lifespan=lifespan)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        response = _error(exc.status_code, str(exc.detail))
        if exc.status_code == 401:
            response.headers["WWW-Authenticate"] = "Bearer"
        return response

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        where = {"query", "path", "body"}
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'] if p not in where)}: {e['msg']}"
            for e in exc.errors()
        )
        return _error(422, problems)

    def visible_run(db: Store, token: Token, run_id: str) -> Run:
        try:
            run = db.get_run(run_id)
        except RunNotFound:
            raise HTTPException(404, f"no run {run_id}") from None
        if token.gateway is not None and run.gateway != token.gateway:
            raise HTTPException(404, f"no run {run_id}")
        return run

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        """The process is up."""
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz(db: StoreDep) -> JSONResponse:
        """The store answers and its schema is current."""
        try:
            db.ping()
            current = db.schema_is_current()
        except Exception as exc:
            return _error(503, f"store unavailable: {type(exc).__name__}")
        if not current:
            return _error(503, "store schema is not current: run `quarry db upgrade`")
        return JSONResponse({"status": "ready"})

    @app.get("/api/v1/action-runs")
    def list_runs(
        db: StoreDep,
        token: TokenDep,
        status: Status | None = None,
        pipeline: Annotated[str | None, Query(max_length=200)] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
    ) -> dict[str, Any]:
        """Runs, newest first."""
        runs = db.list_runs(status=status, pipeline=pipeline, limit=limit)
        if token.gateway is not None:
            runs = [r for r in runs if r.gateway == token.gateway]
        return {"runs": [console.run_dict(r) for r in runs]}

    @app.get("/api/v1/action-runs/{run_id}")
    def get_run(run_id: str, db: StoreDep, token: TokenDep) -> dict[str, Any]:
        """One run."""
        return console.run_dict(visible_run(db, token, run_id))

    @app.get("/api/v1/action-runs/{run_id}/logs")
    def run_logs(  # noqa: PLR0917 - FastAPI reads query parameters from the signature
        run_id: str,
        db: StoreDep,
        token: TokenDep,
        level: Annotated[
            str | None, Query(description="error, or warning = warnings and errors")
        ] = None,
        event: Annotated[str | None, Query(max_length=64)] = None,
        cursor: Annotated[str | None, Query(max_length=20)] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = MAX_PAGE,
    ) -> dict[str, Any]:
        """A run's entries oldest first; ``cursor`` is absent on the last page."""
        visible_run(db, token, run_id)
        try:
            min_level = Level.parse(level) if level else None
        except ValueError:
            raise HTTPException(
                400, f"level: expected info, warning or error, got {level!r}"
            ) from None
        after = 0
        if cursor:
            if not cursor.isdigit():
                raise HTTPException(400, f"cursor: not a cursor this API returned: {cursor!r}")
            after = int(cursor)
        entries = db.entries(
            run_id, after_id=after, limit=limit + 1, min_level=min_level, event=event
        )
        page, more = entries[:limit], len(entries) > limit
        return {
            "entries": [e.as_dict() for e in page],
            "cursor": str(page[-1].id) if more and page else None,
        }

    return app
