"""The HTTP API (FastAPI): runs and their logs over the store, behind bearer tokens.

Every error is JSON: ``{"error": {"status": 404, "message": "…"}}``.
Scopes: ``operator`` may do everything; ``read`` only reads; ``gateway:NAME``
reads only runs targeted at gateway NAME (any other run is a 404).
"""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import AliasChoices, BaseModel, BeforeValidator, ConfigDict, Field
from sse_starlette.sse import EventSourceResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from worker import control, jsonfmt, stream
from worker.errors import (
    ConfigError,
    IllegalTransition,
    InvalidInput,
    LeaseLost,
    QuarryError,
    RunNotFound,
    StoreUnavailable,
    UnknownPipeline,
)
from worker.external import PatchRefused, RunPatch, apply_patch
from worker.limits import JSON_VALUE_SCHEMA, BoundedJson
from worker.models import Event, Level, Run, Status
from worker.notify import Wakeups
from worker.publish import publish_run
from worker.readiness import broker_problem, redis_problem
from worker.runtime import open_store
from worker.scrub import describe, scrubber
from worker.settings import Settings, get_settings
from worker.store import Store
from worker.store.engine import unavailable_errors
from worker.store.reads import JsonPage
from worker.store.tokens import Token

#: Most entries one page of logs returns.
MAX_PAGE = 1000
#: Largest request body accepted, read or declared.
MAX_BODY_BYTES = 1024 * 1024
#: Keep-alive comment interval on streams, seconds.
STREAM_PING_SECONDS = 15
#: What a client is told to wait before retrying while the store is unreachable.
RETRY_AFTER_SECONDS = 5
#: Entry ids and stream event ids: ASCII digits, as this API writes them.
ENTRY_CURSOR = r"^[0-9]{1,18}$"
#: A run id as a runs-page cursor.
RUN_CURSOR = r"^[A-Za-z0-9_\-]{1,64}$"
#: Free text in a query: no store can hold NUL, so the schema refuses it as the guard does.
NO_NUL = r"^[^\x00]*$"
#: Earliest and latest Unix milliseconds a ``from``/``to`` filter takes (years 1 to 9999).
MIN_UNIX_MS = -62_135_596_800_000
MAX_UNIX_MS = 253_402_300_799_999

#: A runs-page cursor names a run; one this token cannot see answers as an unknown one does.
_NO_CURSOR_RUN = "cursor: no such run in this view (a cursor is the last run id of a page)"

_bearer = HTTPBearer(auto_error=False)
_log = logging.getLogger("quarry.api")


class ErrorDetail(BaseModel):
    """The error of a refused request."""

    status: int
    message: str


class ErrorBody(BaseModel):
    """Every error this API answers: ``{"error": {"status": 404, "message": "…"}}``."""

    error: ErrorDetail


def _documented(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for the error codes a route can answer (all JSON ErrorBody)."""
    reasons = {
        400: "A parameter is malformed, unknown, or a token was put in the URL.",
        401: "No bearer token, or a token that is unknown or revoked.",
        403: "The token's scope does not allow this.",
        404: "No such run (or not one this token may see).",
        409: "The run's state or lease does not allow this change.",
        413: "The request body is over 1 MiB.",
        422: "The body or a parameter fails validation; the message names the field.",
        503: "The store (or the broker, for a trigger) is unreachable; retry after Retry-After.",
    }
    return {
        code: {"model": ErrorBody, "description": reasons[code]}
        for code in sorted({400, 413, 422, 503, *codes})
    }


def _error(status: int, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse(
        {"error": {"status": status, "message": scrubber.text(message)}},
        status_code=status,
        headers=headers,
    )


def _unavailable() -> JSONResponse:
    return _error(
        503,
        "the store is unreachable; retry shortly",
        {"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


def _json(value: Any, status_code: int = 200) -> Response:
    """A JSON response that survives a stored value no encoder can write (see jsonfmt)."""
    return Response(jsonfmt.safe_bytes(value), status_code, media_type="application/json")


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


def _as_utc(value: int | datetime | None) -> datetime | None:
    """A ``from``/``to`` bound in UTC; one past the datetime range is clamped to its edge."""
    if value is None:
        return None
    if isinstance(value, int):
        return datetime.fromtimestamp(value / 1000, tz=UTC)
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    try:
        return value.astimezone(UTC)
    except OverflowError:
        edge = datetime.max if value.year > 1 else datetime.min
        return edge.replace(tzinfo=UTC)


def _time_bound(value: Any) -> Any:
    """Unix milliseconds (ASCII digits) stay an int; anything else must be ISO 8601."""
    if isinstance(value, str) and value.lstrip("-").isascii() and value.lstrip("-").isdigit():
        return int(value)
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
        except ValueError:
            msg = "expected Unix milliseconds or an ISO 8601 date-time"
            raise ValueError(msg) from None
    return value


#: ``from`` / ``to``: Unix milliseconds or an ISO 8601 date-time (UTC when it has no offset).
TimeBound = Annotated[
    Annotated[int, Field(ge=MIN_UNIX_MS, le=MAX_UNIX_MS)] | datetime | None,
    BeforeValidator(_time_bound),
]


def _event_name(value: str | None) -> str | None:
    """An event filter; the seed's upper-case spelling of one of ours (RUN_COMPLETED) is ours."""
    if value is not None and value.lower() in _EVENT_NAMES:
        return value.lower()
    return value


_EVENT_NAMES = frozenset(event.value for event in Event)
EventName = Annotated[
    str | None, Field(max_length=64, pattern=NO_NUL), BeforeValidator(_event_name)
]


#: A minimum level as the API takes it; ``warn`` is read as ``warning``.
LevelName = Literal["debug", "info", "warn", "warning", "error"]


class _Query(BaseModel):
    """Query parameters: unknown names are refused (400), so a misspelled filter never
    silently returns everything."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class RunsQuery(_Query):
    """``GET /api/v1/action-runs``."""

    status: Status | None = None
    pipeline: str | None = Field(default=None, max_length=200, pattern=NO_NUL)
    gateway: str | None = Field(default=None, max_length=200, pattern=NO_NUL)
    cursor: str | None = Field(default=None, pattern=RUN_CURSOR)
    limit: int = Field(default=50, ge=1, le=MAX_PAGE)


class AgentQuery(_Query):
    """``GET /api/v1/agent/runs``."""

    cursor: str | None = Field(default=None, pattern=RUN_CURSOR)
    limit: int = Field(default=100, ge=1, le=MAX_PAGE)


class RunLogQuery(_Query):
    """``GET /api/v1/action-runs/{id}/logs``; ``count``, ``fromDate`` and ``toDate`` are the
    flat view's spellings, accepted here too."""

    level: LevelName | None = Field(
        default=None, description="This level and above: warning (or warn) = warnings and errors"
    )
    event: EventName = None
    from_: TimeBound = Field(default=None, validation_alias=AliasChoices("from", "fromDate"))
    to: TimeBound = Field(default=None, validation_alias=AliasChoices("to", "toDate"))
    cursor: str | None = Field(default=None, pattern=ENTRY_CURSOR)
    limit: int = Field(
        default=MAX_PAGE, ge=1, le=MAX_PAGE, validation_alias=AliasChoices("limit", "count")
    )


class FlatLogQuery(_Query):
    """``GET /api/v1/logs``, with the seed's spellings as aliases (``workflowRunId``,
    ``state``, ``fromDate``, ``toDate``) and ``limit`` for ``count``."""

    run_id: str | None = Field(
        default=None,
        max_length=64,
        pattern=NO_NUL,
        validation_alias=AliasChoices("run_id", "runId", "workflowRunId"),
    )
    pipeline: str | None = Field(default=None, max_length=200, pattern=NO_NUL)
    event: EventName = Field(default=None, validation_alias=AliasChoices("event", "state"))
    worker_id: str | None = Field(
        default=None,
        max_length=200,
        pattern=NO_NUL,
        validation_alias=AliasChoices("worker_id", "workerId"),
    )
    from_: TimeBound = Field(default=None, validation_alias=AliasChoices("from", "fromDate"))
    to: TimeBound = Field(default=None, validation_alias=AliasChoices("to", "toDate"))
    count: int = Field(
        default=MAX_PAGE, ge=1, le=MAX_PAGE, validation_alias=AliasChoices("count", "limit")
    )
    cursor: str | None = Field(default=None, pattern=ENTRY_CURSOR)


def entry_cursor(value: str | None) -> int:
    """An entry cursor this API returned (validated ASCII digits), or 0 for the start."""
    return int(value) if value else 0


class _Guard:
    """Bounds every request before any other work: body size while it is read (413), NUL in
    the path or query (400).

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
            await _too_large()(scope, receive, send)
            return
        if length is None and (
            scope["method"] in {"POST", "PATCH", "PUT", "DELETE"}
            or any(k == b"transfer-encoding" for k, _ in scope["headers"])
        ):
            body = await _read_body(receive, MAX_BODY_BYTES)
            if body is None:
                await _too_large()(scope, receive, send)
                return
            receive = _replay(body, receive)
        # No store can hold NUL in text; a NUL in a filter or an id can match nothing.
        query = scope.get("query_string", b"")
        if "\x00" in scope["path"] or b"\x00" in query or b"%00" in query:
            message = "NUL characters are not allowed in paths or query parameters"
            await _error(400, message)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _too_large() -> JSONResponse:
    # Connection: close, so the server reads no more of a body it has refused.
    return _error(413, f"request body over {MAX_BODY_BYTES} bytes", {"Connection": "close"})


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole request body, or None as soon as it passes ``limit`` bytes (the rest unread)."""
    chunks = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
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
    params: BoundedJson = Field(default_factory=dict)
    #: Target the run at an external gateway instead of the Celery workers.
    gateway: str | None = Field(default=None, min_length=1, max_length=200)


class NoQuery(_Query):
    """A route that takes no query parameters refuses any (400)."""


NoQueryDep = Annotated[NoQuery, Query()]


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

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        response = _error(exc.status_code, str(exc.detail), exc.headers)
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
            return _error(400, "tokens in URLs are refused: use the Authorization header")
        if unknown:
            return _error(400, f"unknown query parameter(s): {', '.join(unknown)}")
        where = {"query", "path", "body", "header"}
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'] if p not in where) or 'body'}: {e['msg']}"
            for e in errors
        )
        # A malformed parameter is a bad request (400); a body that fails validation, 422.
        in_body = any(e["loc"][:1] == ("body",) for e in errors)
        return _error(422 if in_body else 400, problems)

    async def _store_down(request: Request, exc: Exception) -> JSONResponse:
        # A known outage: one line, no traceback, and the client told when to retry.
        _log.error("%s %s: store unavailable: %s", request.method, request.url.path, describe(exc))
        return _unavailable()

    for error in (*unavailable_errors(), StoreUnavailable):
        app.add_exception_handler(error, _store_down)

    @app.exception_handler(Exception)
    async def _bug(_request: Request, _exc: Exception) -> JSONResponse:
        # Starlette still logs the traceback after this answer: a bug must be seen.
        return _error(500, "internal error")

    @app.exception_handler(InvalidInput)
    async def _out_of_bounds(_request: Request, exc: InvalidInput) -> JSONResponse:
        return _error(422, str(exc))

    def visible_run(db: Store, token: Token, run_id: str) -> Run:
        try:
            run = db.get_run(run_id)
        except RunNotFound:
            raise HTTPException(404, f"no run {run_id}") from None
        if token.gateway is not None and run.gateway != token.gateway:
            raise HTTPException(404, f"no run {run_id}")
        return run

    @app.get("/healthz", responses=_documented())
    async def healthz(_q: NoQueryDep) -> dict[str, str]:
        """The process is up (answered on the event loop: a full thread pool does not fail it)."""
        return {"status": "ok"}

    @app.get("/readyz", responses=_documented())
    def readyz(db: StoreDep, _q: NoQueryDep) -> JSONResponse:
        """The store answers and its schema is current; the broker and Redis accept connections."""
        try:
            db.ping()
            current = db.schema_is_current()
        except Exception as exc:
            return _error(503, f"store unavailable: {type(exc).__name__}")
        if not current:
            return _error(503, "store schema is not current: run `quarry db upgrade`")
        problem = broker_problem(settings) or redis_problem(settings)
        if problem is not None:
            return _error(503, problem)
        return JSONResponse({"status": "ready"})

    @app.get("/api/v1/action-runs", responses=_documented(401, 403, 404))
    def list_runs(db: StoreDep, token: TokenDep, q: Annotated[RunsQuery, Query()]) -> Response:
        """Runs, newest first; ``cursor`` is null on the last page."""
        gateway = q.gateway
        if token.gateway is not None:
            if gateway not in {None, token.gateway}:
                return _json({"runs": [], "cursor": None})
            gateway = token.gateway
        try:
            runs = db.list_runs(
                status=q.status,
                pipeline=q.pipeline,
                gateway=gateway,
                cursor=q.cursor,
                limit=q.limit + 1,
            )
        except RunNotFound:
            raise HTTPException(404, _NO_CURSOR_RUN) from None
        page, more = runs[: q.limit], len(runs) > q.limit
        return _json(
            {"runs": [r.as_dict() for r in page], "cursor": page[-1].id if more and page else None}
        )

    @app.post("/api/v1/action-runs", status_code=201, responses=_documented(401, 403, 404))
    def trigger(body: TriggerBody, db: StoreDep, _token: OperatorDep, _q: NoQueryDep) -> Response:
        """Queue a run of a pipeline; 201 with the run."""
        try:
            run = control.trigger(
                db, settings, publish_run, body.pipeline, body.params, gateway=body.gateway
            )
        except QuarryError as exc:
            raise HTTPException(_status_of(exc), str(exc)) from None
        return _json(run.as_dict(), 201)

    @app.get("/api/v1/action-runs/{run_id}", responses=_documented(401, 404))
    def get_run(run_id: str, db: StoreDep, token: TokenDep, _q: NoQueryDep) -> Response:
        """One run."""
        return _json(visible_run(db, token, run_id).as_dict())

    @app.post("/api/v1/action-runs/{run_id}/cancel", responses=_documented(401, 403, 404, 409))
    def cancel(run_id: str, db: StoreDep, token: OperatorDep, _q: NoQueryDep) -> Response:
        """Cancel: at once when queued or interrupted, at the next heartbeat when running."""
        visible_run(db, token, run_id)
        try:
            return _json(control.cancel(db, run_id).as_dict())
        except IllegalTransition as exc:
            raise HTTPException(409, str(exc)) from None

    @app.patch("/api/v1/action-runs/{run_id}", responses=_documented(401, 403, 404, 409))
    def patch_run(
        run_id: str, body: RunPatch, db: StoreDep, token: ReporterDep, _q: NoQueryDep
    ) -> Response:
        """External runners: claim, report logs and telemetry, finish (see worker/external.py).

        Only runs targeted at a gateway take PATCHes; the whole PATCH applies, or none of it.
        """
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
        return _json({**db.get_run(run_id).as_dict(), **extra})

    @app.get("/api/v1/agent/runs", responses=_documented(401, 403, 404))
    def agent_runs(db: StoreDep, token: ReporterDep, q: Annotated[AgentQuery, Query()]) -> Response:
        """Queued runs targeted at this token's gateway, oldest first, for it to claim.

        ``cursor`` (the last run id of a page) is null on the last page.
        """
        if token.gateway is None:
            raise HTTPException(403, "this lists a gateway's runs: use a gateway:NAME token")
        try:
            runs = db.list_runs(
                status=Status.QUEUED,
                gateway=token.gateway,
                cursor=q.cursor,
                limit=q.limit + 1,
                oldest_first=True,
            )
        except RunNotFound:
            raise HTTPException(404, _NO_CURSOR_RUN) from None
        page, more = runs[: q.limit], len(runs) > q.limit
        return _json(
            {"runs": [r.as_dict() for r in page], "cursor": page[-1].id if more and page else None}
        )

    @app.get("/api/v1/action-runs/{run_id}/logs", responses=_documented(401, 404))
    def run_logs(
        run_id: str, db: StoreDep, token: TokenDep, q: Annotated[RunLogQuery, Query()]
    ) -> Response:
        """A run's entries oldest first; ``cursor`` is null on the last page."""
        try:
            # The run's visibility and the page on one connection, the page as JSON bytes.
            page = db.run_entry_page_json(
                run_id,
                gateway=token.gateway,
                after_id=entry_cursor(q.cursor),
                limit=q.limit,
                min_level=Level.parse(q.level) if q.level else None,
                event=q.event,
                since=_as_utc(q.from_),
                until=_as_utc(q.to),
            )
        except RunNotFound:
            raise HTTPException(404, f"no run {run_id}") from None
        return _page_response(page, null_cursor=True)

    @app.get("/api/v1/action-runs/{run_id}/logs/stream", responses=_documented(401, 404))
    async def run_stream(
        run_id: str,
        request: Request,
        db: StoreDep,
        token: TokenDep,
        _q: NoQueryDep,
        last_event_id: Annotated[
            str | None, Header(alias="Last-Event-ID", pattern=ENTRY_CURSOR)
        ] = None,
    ) -> EventSourceResponse:
        """Server-Sent Events: each entry as it lands; resumes after ``Last-Event-ID``."""
        if db.dialect == "sqlite":
            visible_run(db, token, run_id)
        else:
            await run_in_threadpool(visible_run, db, token, run_id)
        secret: str = request.state.secret
        events = stream.entry_events(
            request.app.state.feeds,
            run_id,
            after_id=entry_cursor(last_event_id),
            secret=secret,
            still_authorised=lambda: db.verify_token(secret) is not None,
            disconnected=request.is_disconnected,
        )
        return EventSourceResponse(events, ping=STREAM_PING_SECONDS)

    @app.get(
        "/metrics",
        response_class=Response,
        responses={
            200: {
                "content": {"text/plain; version=0.0.4": {"schema": {"type": "string"}}},
                "description": "Prometheus text format.",
            },
            **_documented(),
        },
    )
    def metrics(db: StoreDep, _q: NoQueryDep) -> Response:
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

    @app.get("/api/v1/logs", responses=_documented(401, 403))
    def flat_logs(db: StoreDep, token: TokenDep, q: Annotated[FlatLogQuery, Query()]) -> Response:
        """Entries across runs, oldest first; no ``cursor`` in the answer means the end."""
        if token.gateway is not None:
            raise HTTPException(403, "the flat view needs an operator or read token")
        page = db.entry_page_json(
            q.run_id,
            after_id=entry_cursor(q.cursor),
            limit=q.count,
            event=q.event,
            worker_id=q.worker_id,
            pipeline=q.pipeline,
            since=_as_utc(q.from_),
            until=_as_utc(q.to),
        )
        return _page_response(page, null_cursor=False)

    return app


def _allowed_methods(app: FastAPI, scope: Scope) -> list[str]:
    """Every method some route serves at the request's path."""
    methods: set[str] = set()
    for route in app.router.routes:
        if isinstance(route, APIRoute) and route.matches(scope)[0] is not Match.NONE:
            methods |= route.methods or set()
    return sorted(methods)


def _status_of(exc: QuarryError) -> int:
    if isinstance(exc, UnknownPipeline):
        return 404
    if isinstance(exc, ConfigError | InvalidInput):
        return 422
    return 503
