"""The HTTP API (FastAPI): runs and their logs over the store, behind bearer tokens.

Every error is JSON: ``{"error": {"status": 404, "message": "…"}}``.
Scopes: ``operator`` may do everything; ``read`` only reads; ``gateway:NAME``
reads only runs targeted at gateway NAME (any other run is a 404).
"""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from sse_starlette.sse import EventSourceResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from worker import console, control, stream
from worker.errors import (
    ConfigError,
    IllegalTransition,
    LeaseLost,
    QuarryError,
    RunNotFound,
    UnknownPipeline,
)
from worker.external import PatchRefused, RunPatch, apply_patch
from worker.models import Level, Run, Status
from worker.notify import Wakeups
from worker.runtime import open_store
from worker.scrub import scrubber
from worker.settings import Settings, get_settings
from worker.store import Store
from worker.store.reads import JsonPage
from worker.store.tokens import Token
from worker.tasks import publish_run

#: Most entries one page of logs returns.
MAX_PAGE = 1000
#: Largest request body accepted.
MAX_BODY_BYTES = 1024 * 1024
#: Keep-alive comment interval on streams, seconds.
STREAM_PING_SECONDS = 15

_bearer = HTTPBearer(auto_error=False)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse(
        {"error": {"status": status, "message": scrubber.text(message)}}, status_code=status
    )


def _page_response(page: JsonPage, *, null_cursor: bool) -> Response:
    """``{"entries": [...], "cursor": "<id>"}`` around the store's JSON, FastAPI's encoder skipped.

    The cursor is a string; on the last page it is null (``null_cursor``) or absent.
    """
    if page.cursor is not None:
        tail = b',"cursor":"%d"}' % page.cursor
    else:
        tail = b',"cursor":null}' if null_cursor else b"}"
    return Response(b"".join((b'{"entries":', page.entries, tail)), media_type="application/json")


def _store_of(request: Request) -> Store:
    return request.app.state.store  # type: ignore[no-any-return]


async def _store(request: Request) -> Store:
    # async: a plain attribute read, not worth a trip through the thread pool.
    return _store_of(request)


StoreDep = Annotated[Store, Depends(_store)]


async def _authenticated(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Token:
    if request.query_params.get("token") or request.query_params.get("access_token"):
        raise HTTPException(400, "tokens in URLs are refused: use the Authorization header")
    if credentials is None:
        raise HTTPException(401, "missing bearer token")
    store = _store_of(request)
    if store.dialect == "sqlite":
        # One indexed read of a local file, on the event loop: the trip through the thread
        # pool and back cost more than the read.
        token = store.verify_token(credentials.credentials)
    else:  # a network round trip: off the loop
        token = await run_in_threadpool(store.verify_token, credentials.credentials)
    if token is None:
        raise HTTPException(401, "invalid or revoked token")
    request.state.secret = credentials.credentials
    return token


TokenDep = Annotated[Token, Depends(_authenticated)]


def _operator(token: TokenDep) -> Token:
    if token.scope != "operator":
        raise HTTPException(
            403, f"this needs an operator token; this token's scope is {token.scope}"
        )
    return token


OperatorDep = Annotated[Token, Depends(_operator)]


def _reporter(token: TokenDep) -> Token:
    if token.scope == "read":
        raise HTTPException(403, "a read token cannot change runs")
    return token


ReporterDep = Annotated[Token, Depends(_reporter)]


def parse_time(field: str, value: str | None) -> datetime | None:
    """``from`` / ``to`` as Unix milliseconds or ISO 8601, in UTC."""
    if value is None or value == "":
        return None
    try:
        if value.lstrip("-").isdigit():
            return datetime.fromtimestamp(int(value) / 1000, tz=UTC)
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except (ValueError, OverflowError, OSError):
        msg = f"{field}: expected Unix milliseconds or ISO 8601, got {value!r}"
        raise HTTPException(400, msg) from None
    return parsed.astimezone(UTC) if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def parse_cursor(value: str | None) -> int:
    """A cursor this API returned (the last entry id), or 0 for the start."""
    if not value:
        return 0
    if not value.isdigit() or len(value) > 18:
        raise HTTPException(400, f"cursor: not a cursor this API returned: {value!r}")
    return int(value)


def parse_level(value: str | None) -> Level | None:
    """``level``: error; warning (= warnings and errors); info; debug."""
    try:
        return Level.parse(value) if value else None
    except ValueError:
        raise HTTPException(400, f"level: expected info, warning or error, got {value!r}") from None


class _Guard:
    """Refuse request bodies over MAX_BODY_BYTES (413), then NUL in the path or query (400).

    Plain ASGI rather than ``@app.middleware("http")``: that wrapper passes every
    response message through a memory stream and extra tasks, a cost paid by
    each page and by each event of each open stream.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            await _error(413, f"request body over {MAX_BODY_BYTES} bytes")(scope, receive, send)
            return
        if length is None and scope["method"] in {"POST", "PATCH", "PUT"}:
            body = await _read_body(receive)
            if len(body) > MAX_BODY_BYTES:
                await _error(413, f"request body over {MAX_BODY_BYTES} bytes")(scope, receive, send)
                return
            receive = _replay(body, receive)
        # No store can hold NUL in text; a NUL in a filter or an id can match nothing.
        query = scope.get("query_string", b"")
        if "\x00" in scope["path"] or b"\x00" in query or b"%00" in query:
            message = "NUL characters are not allowed in paths or query parameters"
            await _error(400, message)(scope, receive, send)
            return
        await self.app(scope, receive, send)


async def _read_body(receive: Receive) -> bytes:
    """The whole request body (a client that goes away leaves what was read)."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that hands the app the body already read, then the client's own messages."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed() -> Message:
        if pending:
            return pending.pop()
        return await receive()

    return replayed


class TriggerBody(BaseModel):
    """``POST /api/v1/action-runs``."""

    model_config = ConfigDict(extra="forbid")

    pipeline: str = Field(min_length=1, max_length=200)
    params: dict[str, Any] = Field(default_factory=dict)
    #: Target the run at an external gateway instead of the Celery workers.
    gateway: str | None = Field(default=None, min_length=1, max_length=200)


def create_app(settings: Settings | None = None) -> FastAPI:  # noqa: PLR0915 - routes read best together
    """The API application over the store named by ``settings``."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.store = open_store(settings)
        app.state.wakeups = None
        if settings.notify_url:
            app.state.wakeups = Wakeups(settings.notify_url)
            await app.state.wakeups.start()
        app.state.feeds = stream.Feeds(app.state.store, app.state.wakeups)
        # Everything loaded so far lives as long as the process: out of the collector's
        # sight, a full collection no longer walks it (it stalled a page for 60-90 ms).
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            if app.state.wakeups is not None:
                await app.state.wakeups.stop()
            app.state.store.close()

    app = FastAPI(title="Quarry", version="1", lifespan=lifespan)

    app.add_middleware(_Guard)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        response = _error(exc.status_code, str(exc.detail))
        if exc.status_code == 401:
            response.headers["WWW-Authenticate"] = "Bearer"
        return response

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        where = {"query", "path", "body", "header"}
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'] if p not in where) or 'body'}: {e['msg']}"
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
    async def healthz() -> dict[str, str]:
        """The process is up (answered on the event loop: a full thread pool does not fail it)."""
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
    def list_runs(  # noqa: PLR0917 - FastAPI reads query parameters from the signature
        db: StoreDep,
        token: TokenDep,
        status: Status | None = None,
        pipeline: Annotated[str | None, Query(max_length=200)] = None,
        gateway: Annotated[str | None, Query(max_length=200)] = None,
        cursor: Annotated[str | None, Query(max_length=64)] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
    ) -> dict[str, Any]:
        """Runs, newest first; ``cursor`` is null on the last page."""
        if token.gateway is not None:
            if gateway not in {None, token.gateway}:
                return {"runs": [], "cursor": None}
            gateway = token.gateway
        try:
            runs = db.list_runs(
                status=status, pipeline=pipeline, gateway=gateway, before=cursor, limit=limit + 1
            )
        except RunNotFound:
            raise HTTPException(
                400, f"cursor: not a cursor this API returned: {cursor!r}"
            ) from None
        page, more = runs[:limit], len(runs) > limit
        return {
            "runs": [console.run_dict(r) for r in page],
            "cursor": page[-1].id if more and page else None,
        }

    @app.post("/api/v1/action-runs", status_code=201)
    def trigger(body: TriggerBody, db: StoreDep, _token: OperatorDep) -> dict[str, Any]:
        """Queue a run of a pipeline; 201 with the run."""
        try:
            run = control.trigger(
                db, settings, publish_run, body.pipeline, body.params, gateway=body.gateway
            )
        except QuarryError as exc:
            raise HTTPException(_status_of(exc), str(exc)) from None
        return console.run_dict(run)

    @app.get("/api/v1/action-runs/{run_id}")
    def get_run(run_id: str, db: StoreDep, token: TokenDep) -> dict[str, Any]:
        """One run."""
        return console.run_dict(visible_run(db, token, run_id))

    @app.post("/api/v1/action-runs/{run_id}/cancel")
    def cancel(run_id: str, db: StoreDep, token: OperatorDep) -> dict[str, Any]:
        """Cancel: at once when queued or interrupted, at the next heartbeat when running."""
        visible_run(db, token, run_id)
        try:
            return console.run_dict(control.cancel(db, run_id))
        except IllegalTransition as exc:
            raise HTTPException(409, str(exc)) from None

    @app.patch("/api/v1/action-runs/{run_id}")
    def patch_run(run_id: str, body: RunPatch, db: StoreDep, token: ReporterDep) -> dict[str, Any]:
        """External runners: claim, report logs and telemetry, finish (see worker/external.py)."""
        run = visible_run(db, token, run_id)
        owner = f"gateway:{token.gateway}" if token.gateway else f"token:{token.id}"
        try:
            extra = apply_patch(db, settings, run, body, owner)
        except LeaseLost:
            raise HTTPException(
                409, "lease lost: this run was recovered or claimed by another runner"
            ) from None
        except (IllegalTransition, PatchRefused) as exc:
            raise HTTPException(409, str(exc)) from None
        return {**console.run_dict(db.get_run(run_id)), **extra}

    @app.get("/api/v1/agent/runs")
    def agent_runs(db: StoreDep, token: ReporterDep) -> dict[str, Any]:
        """Queued runs targeted at this token's gateway, oldest first, for it to claim."""
        if token.gateway is None:
            raise HTTPException(403, "this lists a gateway's runs: use a gateway:NAME token")
        runs = [
            r
            for r in reversed(db.list_runs(status=Status.QUEUED, limit=MAX_PAGE))
            if r.gateway == token.gateway
        ]
        return {"runs": [console.run_dict(r) for r in runs]}

    @app.get("/api/v1/action-runs/{run_id}/logs")
    def run_logs(  # noqa: PLR0917 - FastAPI reads query parameters from the signature
        run_id: str,
        db: StoreDep,
        token: TokenDep,
        level: Annotated[
            str | None, Query(description="error; warning = warnings and errors")
        ] = None,
        event: Annotated[str | None, Query(max_length=64)] = None,
        from_: Annotated[str | None, Query(alias="from", max_length=40)] = None,
        to: Annotated[str | None, Query(max_length=40)] = None,
        cursor: Annotated[str | None, Query(max_length=20)] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = MAX_PAGE,
    ) -> Response:
        """A run's entries oldest first; ``cursor`` is null on the last page."""
        try:
            after_id = parse_cursor(cursor)
            min_level = parse_level(level)
            since, until = parse_time("from", from_), parse_time("to", to)
        except HTTPException:
            visible_run(db, token, run_id)  # an unknown run is a 404 before a bad parameter
            raise
        try:
            # The run's visibility and the page on one connection, the page as JSON bytes.
            page = db.run_entry_page_json(
                run_id,
                gateway=token.gateway,
                after_id=after_id,
                limit=limit,
                min_level=min_level,
                event=event,
                since=since,
                until=until,
            )
        except RunNotFound:
            raise HTTPException(404, f"no run {run_id}") from None
        return _page_response(page, null_cursor=True)

    @app.get("/api/v1/action-runs/{run_id}/logs/stream")
    async def run_stream(
        run_id: str,
        request: Request,
        db: StoreDep,
        token: TokenDep,
        last_event_id: Annotated[str | None, Header(alias="Last-Event-ID", max_length=20)] = None,
    ) -> EventSourceResponse:
        """Server-Sent Events: each entry as it lands; resumes after ``Last-Event-ID``."""
        visible_run(db, token, run_id)
        secret: str = request.state.secret
        events = stream.entry_events(
            request.app.state.feeds,
            run_id,
            after_id=parse_cursor(last_event_id),
            secret=secret,
            still_authorised=lambda: db.verify_token(secret) is not None,
            disconnected=request.is_disconnected,
        )
        return EventSourceResponse(events, ping=STREAM_PING_SECONDS)

    @app.get("/metrics")
    def metrics(db: StoreDep) -> Response:
        """Prometheus text format: runs by status, recoveries, entries written, stream clients."""
        stats = db.stats()
        lines = [
            "# HELP quarry_runs Runs in the store by status.",
            "# TYPE quarry_runs gauge",
            *(
                f'quarry_runs{{status="{status.value}"}} {stats["runs"].get(status.value, 0)}'
                for status in Status
            ),
            "# HELP quarry_run_recoveries_total Expired leases recovered by the watchdog.",
            "# TYPE quarry_run_recoveries_total counter",
            f"quarry_run_recoveries_total {stats['recoveries']}",
            "# HELP quarry_log_entries_total Log entries written (the newest entry id).",
            "# TYPE quarry_log_entries_total counter",
            f"quarry_log_entries_total {stats['max_entry_id']}",
            "# HELP quarry_stream_clients Open log streams on this API process.",
            "# TYPE quarry_stream_clients gauge",
            f"quarry_stream_clients {stream.CLIENTS.value}",
        ]
        return Response("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    @app.get("/api/v1/logs")
    def flat_logs(  # noqa: PLR0917 - FastAPI reads query parameters from the signature
        db: StoreDep,
        token: TokenDep,
        run_id: Annotated[str | None, Query(max_length=64)] = None,
        pipeline: Annotated[str | None, Query(max_length=200)] = None,
        event: Annotated[str | None, Query(max_length=64)] = None,
        worker_id: Annotated[str | None, Query(max_length=200)] = None,
        from_: Annotated[str | None, Query(alias="from", max_length=40)] = None,
        to: Annotated[str | None, Query(max_length=40)] = None,
        count: Annotated[int, Query(ge=1, le=MAX_PAGE)] = MAX_PAGE,
        cursor: Annotated[str | None, Query(max_length=20)] = None,
    ) -> Response:
        """Entries across runs, oldest first; no ``cursor`` in the answer means the end."""
        if token.gateway is not None:
            raise HTTPException(403, "the flat view needs an operator or read token")
        page = db.entry_page_json(
            run_id,
            after_id=parse_cursor(cursor),
            limit=count,
            event=event,
            worker_id=worker_id,
            pipeline=pipeline,
            since=parse_time("from", from_),
            until=parse_time("to", to),
        )
        return _page_response(page, null_cursor=False)

    return app


def _status_of(exc: QuarryError) -> int:
    if isinstance(exc, UnknownPipeline):
        return 404
    if isinstance(exc, ConfigError):
        return 422
    return 503
