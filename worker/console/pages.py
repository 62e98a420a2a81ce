"""The console's pages and fragments: runs, a run, pipelines, sign-in and sign-out.

Server-rendered with Jinja2 (autoescaped); htmx refreshes the live parts by
fetching fragments of the same templates, and ``static/console.js`` runs the log
view and the sparklines on the API the console shares with every other client.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode

import orjson
from fastapi import APIRouter, Depends, Form, HTTPException, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from worker import control
from worker.api.auth import SESSION_COOKIE, visible_run
from worker.api.params import NO_NUL, RUN_CURSOR
from worker.api.runs import operator_errors, token_label
from worker.console import session as auth
from worker.console import views
from worker.console.session import Viewer
from worker.errors import IllegalTransition, QuarryError, RunNotFound
from worker.models import TERMINAL, Run, Status
from worker.pipelines import load_pipelines
from worker.publish import publish_run
from worker.settings import Settings
from worker.store import Store
from worker.store.console import Dashboard
from worker.wording import attempt_summary

HERE = Path(__file__).parent
templates = Jinja2Templates(directory=HERE / "templates")
templates.env.filters["inert"] = views.inert
templates.env.globals["status_values"] = [status.value for status in Status]

#: What the console's pages allow the browser to load and run: this origin's files only,
#: no inline script or style, no frames, no other origin's forms.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self'; form-action 'self'; frame-ancestors 'none'; "
    "base-uri 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}
#: Runs per page of the runs table.
PAGE_SIZE = 50
#: How long one process reuses the dashboard strip's counts.
STRIP_SECONDS = 5.0

router = APIRouter(include_in_schema=False)
ViewerDep = Annotated[Viewer, Depends(auth.viewer)]


def _store(request: Request) -> Store:
    return request.app.state.store  # type: ignore[no-any-return]


def _settings(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


def render(request: Request, name: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    """A template as a page, with the console's security headers."""
    response = templates.TemplateResponse(request, name, context, status_code=status_code)
    response.headers.update(SECURITY_HEADERS)
    return response


def error_page(request: Request, status_code: int, message: str) -> HTMLResponse:
    """An error as a page (the API's routes answer JSON instead)."""
    return render(request, "error.html", status_code, status=status_code, message=message)


def _see_other(location: str) -> RedirectResponse:
    response = RedirectResponse(location, status_code=303)
    response.headers.update(SECURITY_HEADERS)
    return response


# --- sign-in -------------------------------------------------------------------------------


@router.get("/", response_class=HTMLResponse)
async def home() -> RedirectResponse:
    """The console starts at the runs."""
    return _see_other("/runs")


@router.get("/signin", response_class=HTMLResponse)
async def signin_form(request: Request, next: str | None = None) -> HTMLResponse:
    """The sign-in form."""
    auth.refuse_token_in_query(request)
    return render(request, "signin.html", next=auth.safe_next(next), problem=None)


@router.post("/signin", response_class=HTMLResponse)
async def signin(
    request: Request,
    token: Annotated[str, Form(max_length=200)],
    next: Annotated[str, Form(max_length=2000)] = "/runs",
) -> Response:
    """Exchange a token for a session cookie; the token itself is kept nowhere."""
    auth.refuse_token_in_query(request)
    if not auth.same_origin(request):
        raise HTTPException(403, "cross-origin request refused")
    ttl = timedelta(hours=_settings(request).console_session_hours)
    made = await auth.exchange(_store(request), token, ttl)
    if made is None:
        return render(
            request,
            "signin.html",
            401,
            next=auth.safe_next(next),
            problem="That token is not valid, or it has been revoked.",
        )
    _, secret = made
    response = _see_other(auth.safe_next(next))
    auth.set_cookie(request, response, secret, ttl)
    return response


@router.post("/signout", response_class=HTMLResponse)
async def signout(
    request: Request, viewer: ViewerDep, csrf: Annotated[str, Form(max_length=200)]
) -> Response:
    """End the session: the row goes, so every open live view of it ends too."""
    auth.check_form(request, viewer, csrf)
    secret = request.cookies.get(SESSION_COOKIE, "")
    await run_in_threadpool(_store(request).end_session, secret)
    response = _see_other("/signin")
    auth.clear_cookie(request, response)
    return response


# --- runs ----------------------------------------------------------------------------------


class RunFilters(BaseModel):
    """The runs page's filters, as they appear in its URL."""

    model_config = ConfigDict(extra="forbid")

    status: Status | None = None
    pipeline: str | None = Field(default=None, max_length=200, pattern=NO_NUL)
    gateway: str | None = Field(default=None, max_length=200, pattern=NO_NUL)
    cursor: str | None = Field(default=None, pattern=RUN_CURSOR)

    def query(self, **changes: str | None) -> str:
        """This view's query string, with ``changes``; empty values left out."""
        values = {k: (v.value if isinstance(v, Status) else v) for k, v in self}
        values.update(changes)
        return urlencode({k: v for k, v in values.items() if v})


def _filters(request: Request, viewer: Viewer) -> RunFilters:
    raw = {k: v for k, v in request.query_params.items() if v != ""}
    try:
        filters = RunFilters.model_validate(raw)
    except ValidationError as exc:
        problem = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise HTTPException(400, problem) from None
    if viewer.gateway is not None:
        # A gateway token sees its gateway's runs, whatever the URL asks.
        filters = filters.model_copy(update={"gateway": viewer.gateway})
    return filters


def _runs_page(store: Store, filters: RunFilters) -> tuple[list[Run], str | None]:
    try:
        found = store.list_runs(
            status=filters.status,
            pipeline=filters.pipeline,
            gateway=filters.gateway,
            cursor=filters.cursor,
            limit=PAGE_SIZE + 1,
        )
    except RunNotFound:
        raise HTTPException(400, "cursor: no such run in this view") from None
    page = found[:PAGE_SIZE]
    more = len(found) > PAGE_SIZE
    return page, (page[-1].id if more and page else None)


def _table_context(store: Store, filters: RunFilters) -> dict[str, Any]:
    page, older = _runs_page(store, filters)
    now = datetime.now(UTC)
    return {
        "rows": [views.run_row(run, now) for run in page],
        "filters": filters,
        "older": filters.query(cursor=older) if older else None,
        "first": filters.query(cursor=None) if filters.cursor else None,
        "table_query": filters.query(),
    }


def _pipeline_names(settings: Settings) -> list[str]:
    """The pipelines the filter offers; none when the file does not load (the pipelines page
    says why)."""
    try:
        return sorted(load_pipelines(settings.pipelines_file))
    except QuarryError:
        return []


class _StripCache:
    """The dashboard strip per gateway scope, reused for :data:`STRIP_SECONDS`."""

    def __init__(self) -> None:
        self._entries: dict[str | None, tuple[float, Dashboard]] = {}

    def get(self, store: Store, gateway: str | None) -> Dashboard:
        now = time.monotonic()
        hit = self._entries.get(gateway)
        if hit is not None and now - hit[0] < STRIP_SECONDS:
            return hit[1]
        strip = store.dashboard(gateway=gateway)
        if len(self._entries) > 1000:  # one per gateway: bounded all the same
            self._entries.clear()
        self._entries[gateway] = (now, strip)
        return strip


_STRIPS = _StripCache()


@router.get("/runs", response_class=HTMLResponse)
def runs_page(request: Request, viewer: ViewerDep) -> HTMLResponse:
    """The runs table, its filters and the dashboard strip."""
    store = _store(request)
    filters = _filters(request, viewer)
    return render(
        request,
        "runs.html",
        viewer=viewer,
        strip=_STRIPS.get(store, viewer.gateway),
        pipelines=_pipeline_names(_settings(request)),
        **_table_context(store, filters),
    )


@router.get("/runs/table", response_class=HTMLResponse)
def runs_table(request: Request, viewer: ViewerDep) -> HTMLResponse:
    """The runs table alone, for the page's live refresh."""
    return render(
        request,
        "_runs_table.html",
        viewer=viewer,
        **_table_context(_store(request), _filters(request, viewer)),
    )


@router.get("/strip", response_class=HTMLResponse)
def strip(request: Request, viewer: ViewerDep) -> HTMLResponse:
    """The dashboard strip alone, for the page's live refresh."""
    return render(request, "_strip.html", strip=_STRIPS.get(_store(request), viewer.gateway))


def _run_context(store: Store, viewer: Viewer, run_id: str) -> dict[str, Any]:
    run = visible_run(store, viewer.token, run_id)
    return {
        "viewer": viewer,
        "run": run,
        "row": views.run_row(run, datetime.now(UTC)),
        "terminal": run.status in TERMINAL,
        "checkpoint": views.checkpoint_words(run),
        "attempt": attempt_summary(run),
        "attempts": views.attempts(store.attempt_history(run.id)),
        "created": views.when(run.created_at),
        "finished": views.when(run.finished_at),
    }


@router.get("/runs/{run_id}", response_class=HTMLResponse)
def run_page(request: Request, run_id: str, viewer: ViewerDep) -> HTMLResponse:
    """One run: header, sparklines, attempts, live log, cancel."""
    return render(request, "run.html", **_run_context(_store(request), viewer, run_id))


@router.get("/runs/{run_id}/header", response_class=HTMLResponse)
def run_header(request: Request, run_id: str, viewer: ViewerDep) -> HTMLResponse:
    """The run's header and attempt history, for the page's live refresh."""
    return render(request, "_run_header.html", **_run_context(_store(request), viewer, run_id))


@router.post("/runs/{run_id}/cancel", response_class=HTMLResponse)
def cancel(
    request: Request,
    run_id: str,
    viewer: ViewerDep,
    csrf: Annotated[str, Form(max_length=200)],
) -> Response:
    """Cancel a run (operator): at once when queued, at its next heartbeat when running."""
    auth.check_form(request, viewer, csrf)
    if not viewer.can_operate:
        raise HTTPException(403, "cancelling needs an operator token")
    store = _store(request)
    visible_run(store, viewer.token, run_id)
    try:
        control.cancel(store, run_id, by=token_label(viewer.token))
    except IllegalTransition as exc:
        raise HTTPException(409, f"this run cannot be cancelled now: {exc}") from None
    return _see_other(f"/runs/{run_id}")


# --- pipelines -----------------------------------------------------------------------------


def _pipelines_page(
    request: Request,
    viewer: Viewer,
    *,
    status_code: int = 200,
    problem: str | None = None,
    failed: str | None = None,
    params_text: str = "",
) -> HTMLResponse:
    settings = _settings(request)
    with operator_errors(settings):
        overview = control.pipelines_overview(_store(request), settings)
    return render(
        request,
        "pipelines.html",
        status_code,
        viewer=viewer,
        pipelines=overview,
        problem=problem,
        failed=failed,
        params_text=params_text,
    )


@router.get("/pipelines", response_class=HTMLResponse)
def pipelines_page(request: Request, viewer: ViewerDep) -> HTMLResponse:
    """Each pipeline: its source, destination, resources, last runs, and a trigger form."""
    return _pipelines_page(request, viewer)


@router.post("/pipelines/{name}/trigger", response_class=HTMLResponse)
def trigger(
    request: Request,
    name: str,
    viewer: ViewerDep,
    csrf: Annotated[str, Form(max_length=200)],
    params: Annotated[str, Form(max_length=64 * 1024)] = "",
) -> Response:
    """Queue a run (operator) with the form's parameters; then its page."""
    auth.check_form(request, viewer, csrf)
    if not viewer.can_operate:
        raise HTTPException(403, "triggering needs an operator token")

    def refused(status_code: int, problem: str) -> HTMLResponse:
        return _pipelines_page(
            request,
            viewer,
            status_code=status_code,
            problem=problem,
            failed=name,
            params_text=params,
        )

    try:
        values = orjson.loads(params) if params.strip() else {}
    except orjson.JSONDecodeError as exc:
        return refused(422, f"params: not valid JSON ({exc.msg} at character {exc.pos})")
    if not isinstance(values, dict):
        return refused(422, 'params: expected a JSON object, like {"since": "2024-01-01"}')
    settings = _settings(request)
    try:
        with operator_errors(settings):
            run = control.trigger(
                _store(request),
                settings,
                publish_run,
                name,
                values,
                triggered_by=token_label(viewer.token),
            )
    except HTTPException as exc:
        return refused(exc.status_code, str(exc.detail))
    return _see_other(f"/runs/{run.id}")
