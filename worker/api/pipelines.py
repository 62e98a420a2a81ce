"""Pipelines: list them with their schedule and state, pause and resume, backfill."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Response
from pydantic import BaseModel, ConfigDict, Field

from worker import control
from worker.api.auth import OperatorDep, SettingsDep, StoreDep, TokenDep
from worker.api.params import NoQueryDep
from worker.api.responses import documented, json_body
from worker.api.runs import operator_errors, token_label
from worker.publish import publish_run
from worker.store.tokens import Token

router = APIRouter()

#: A pipeline name in a path, as the pipelines file allows it.
_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$"
Name = Annotated[str, Path(pattern=_NAME, description="A pipeline's name.")]


class BackfillBody(BaseModel):
    """``POST /api/v1/pipelines/{name}/backfill``: the range whose intervals get a run."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    #: ISO 8601; UTC when it has no offset.
    start: datetime = Field(alias="from")
    end: datetime = Field(alias="to")


def _not_gateway(token: Token) -> None:
    if token.gateway is not None:
        raise HTTPException(403, "a gateway token sees its gateway's runs, not pipelines")


@router.get("/api/v1/pipelines", responses=documented(401, 403))
def list_pipelines(
    db: StoreDep, settings: SettingsDep, token: TokenDep, _q: NoQueryDep
) -> Response:
    """Every pipeline: schedule, next fire time, paused, active runs, the last runs' statuses."""
    _not_gateway(token)
    with operator_errors(settings):
        views = control.pipelines_overview(db, settings)
    return json_body({"pipelines": [v.as_dict() for v in views]})


@router.get("/api/v1/pipelines/{name}", responses=documented(401, 403, 404))
def get_pipeline(
    name: Name, db: StoreDep, settings: SettingsDep, token: TokenDep, _q: NoQueryDep
) -> Response:
    """One pipeline with its state."""
    _not_gateway(token)
    with operator_errors(settings):
        views = control.pipelines_overview(db, settings, name)
    return json_body(views[0].as_dict())


def _set_paused(
    name: str, paused: bool, db: StoreDep, settings: SettingsDep, token: Token
) -> Response:
    with operator_errors(settings):
        control.set_paused(db, settings, name, paused, by=token_label(token))
        views = control.pipelines_overview(db, settings, name)
    return json_body(views[0].as_dict())


@router.post("/api/v1/pipelines/{name}/pause", responses=documented(401, 403, 404))
def pause(
    name: Name, db: StoreDep, settings: SettingsDep, token: OperatorDep, _q: NoQueryDep
) -> Response:
    """Pause: the pipeline's schedule fires no run until it is resumed."""
    return _set_paused(name, True, db, settings, token)


@router.post("/api/v1/pipelines/{name}/resume", responses=documented(401, 403, 404))
def resume(
    name: Name, db: StoreDep, settings: SettingsDep, token: OperatorDep, _q: NoQueryDep
) -> Response:
    """Resume: the schedule's clock restarts now (intervals missed while paused never fire)."""
    return _set_paused(name, False, db, settings, token)


@router.post(
    "/api/v1/pipelines/{name}/backfill", status_code=201, responses=documented(401, 403, 404)
)
def backfill(
    name: Name,
    body: BackfillBody,
    db: StoreDep,
    settings: SettingsDep,
    token: OperatorDep,
    _q: NoQueryDep,
) -> Response:
    """One run per schedule interval within ``[from, to]``; intervals that already have a
    run (an earlier backfill, the schedule) are skipped, so repeating it adds nothing."""
    with operator_errors(settings):
        done = control.backfill(
            db,
            settings,
            publish_run,
            name,
            start=body.start,
            end=body.end,
            triggered_by=token_label(token),
        )
    return json_body(done.as_dict(), 201)
