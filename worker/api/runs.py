"""Runs: list, trigger, read, cancel; the external runners' PATCH and their queue."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Response
from pydantic import BaseModel, ConfigDict, Field

from worker import control
from worker.api.auth import (
    OperatorDep,
    ReporterDep,
    SettingsDep,
    StoreDep,
    TokenDep,
    visible_run,
)
from worker.api.external import PatchRefused, RunPatch, apply_patch
from worker.api.params import AgentQuery, CancelQuery, NoQueryDep, RunsQuery
from worker.api.responses import documented, json_body
from worker.errors import (
    ConfigError,
    IllegalTransition,
    InvalidInput,
    LeaseLost,
    QuarryError,
    RunNotFound,
    UnknownPipeline,
)
from worker.limits import BoundedJson
from worker.models import Run, Status
from worker.publish import publish_run
from worker.settings import Settings
from worker.store.tokens import Token

#: A runs-page cursor names a run; one this token cannot see answers as an unknown one does.
_NO_CURSOR_RUN = "cursor: no such run in this view (a cursor is the last run id of a page)"

router = APIRouter()


class TriggerBody(BaseModel):
    """``POST /api/v1/action-runs``."""

    model_config = ConfigDict(extra="forbid")

    pipeline: str = Field(min_length=1, max_length=200)
    params: BoundedJson = Field(default_factory=dict)
    #: Target the run at an external gateway instead of the Celery workers.
    gateway: str | None = Field(default=None, min_length=1, max_length=200)


def _page(runs: list[Run], limit: int) -> Response:
    """``{"runs": [...], "cursor": …}`` from ``limit + 1`` runs read; null cursor on the last."""
    page, more = runs[:limit], len(runs) > limit
    return json_body(
        {"runs": [r.as_dict() for r in page], "cursor": page[-1].id if more and page else None}
    )


@router.get("/api/v1/action-runs", responses=documented(401, 403, 404))
def list_runs(db: StoreDep, token: TokenDep, q: Annotated[RunsQuery, Query()]) -> Response:
    """Runs, newest first; ``cursor`` is null on the last page."""
    gateway = q.gateway
    if token.gateway is not None:
        if gateway not in {None, token.gateway}:
            return json_body({"runs": [], "cursor": None})
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
    return _page(runs, q.limit)


@router.post("/api/v1/action-runs", status_code=201, responses=documented(401, 403, 404))
def trigger(
    body: TriggerBody, db: StoreDep, settings: SettingsDep, token: OperatorDep, _q: NoQueryDep
) -> Response:
    """Queue a run of a pipeline; 201 with the run (``triggered_by`` names the token)."""
    with operator_errors(settings):
        run = control.trigger(
            db,
            settings,
            publish_run,
            body.pipeline,
            body.params,
            gateway=body.gateway,
            triggered_by=token_label(token),
        )
    return json_body(run.as_dict(), 201)


@router.get("/api/v1/action-runs/{run_id}", responses=documented(401, 404))
def get_run(run_id: str, db: StoreDep, token: TokenDep, _q: NoQueryDep) -> Response:
    """One run."""
    return json_body(visible_run(db, token, run_id).as_dict())


@router.get("/api/v1/action-runs/{run_id}/telemetry", responses=documented(401, 404))
def get_telemetry(run_id: str, db: StoreDep, token: TokenDep, _q: NoQueryDep) -> Response:
    """The run's telemetry: its ``summary`` and its ``samples`` (each ``at`` with the values
    recorded then: ``rows_loaded``, ``bytes_loaded``, ``files_written``, ``progress``),
    oldest first, at most ``QUARRY_TELEMETRY_MAX_SAMPLES``."""
    run = visible_run(db, token, run_id)
    samples = [{**values, "at": at.isoformat()} for at, values in db.samples(run_id)]
    return json_body({"summary": run.telemetry_summary, "samples": samples})


@router.post("/api/v1/action-runs/{run_id}/cancel", responses=documented(401, 403, 404, 409))
def cancel(
    run_id: str, db: StoreDep, token: OperatorDep, q: Annotated[CancelQuery, Query()]
) -> Response:
    """Cancel: at once when queued or interrupted, at the next heartbeat when running;
    with ``force=true`` a running run ends now (its worker's writes are refused)."""
    visible_run(db, token, run_id)
    try:
        run = control.cancel(db, run_id, force=q.force, by=token_label(token))
        return json_body(run.as_dict())
    except IllegalTransition as exc:
        raise HTTPException(409, str(exc)) from None


@router.patch("/api/v1/action-runs/{run_id}", responses=documented(401, 403, 404, 409))
def patch_run(
    run_id: str,
    body: RunPatch,
    db: StoreDep,
    settings: SettingsDep,
    token: ReporterDep,
    _q: NoQueryDep,
) -> Response:
    """External runners: claim, report logs and telemetry, finish (see worker/api/external.py).

    Only runs targeted at a gateway take PATCHes; the whole PATCH applies, or none of it.
    """
    run = visible_run(db, token, run_id)
    owner = f"gateway:{token.gateway}" if token.gateway else f"token:{token.id}"
    try:
        extra: dict[str, Any] = apply_patch(db, settings, run, body, owner)
    except LeaseLost:
        raise HTTPException(
            409, "lease lost: this run was recovered or claimed by another runner"
        ) from None
    except (IllegalTransition, PatchRefused) as exc:
        raise HTTPException(409, str(exc)) from None
    return json_body({**db.get_run(run_id).as_dict(), **extra})


@router.get("/api/v1/agent/runs", responses=documented(401, 403, 404))
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
    return _page(runs, q.limit)


def token_label(token: Token) -> str:
    """How a run records the token that acted: ``token:NAME``."""
    return f"token:{token.name}"


def without_paths(message: str, settings: Settings) -> str:
    """``message`` with the server's pipelines file named by its file name only: a client
    learns which file, never where the server keeps it."""
    path = settings.pipelines_file
    for shown in sorted(
        {str(path.resolve()), str(path.absolute()), str(path)}, key=len, reverse=True
    ):
        message = message.replace(shown, path.name)
    return message


@contextlib.contextmanager
def operator_errors(settings: Settings) -> Iterator[None]:
    """An operator action's error as an HTTP error: its status (:func:`status_of`) and its
    message, naming the pipelines file but never where the server keeps it."""
    try:
        yield
    except QuarryError as exc:
        raise HTTPException(status_of(exc), without_paths(str(exc), settings)) from None


def status_of(exc: QuarryError) -> int:
    """The HTTP status of an operator action's error."""
    if isinstance(exc, UnknownPipeline):
        return 404
    if isinstance(exc, ConfigError | InvalidInput):
        return 422
    return 503
