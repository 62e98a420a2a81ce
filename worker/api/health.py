"""Liveness and readiness probes."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from worker.api.auth import SettingsDep, StoreDep
from worker.api.params import NoQueryDep
from worker.api.responses import documented, error
from worker.readiness import broker_problem, redis_problem
from worker.scrub import describe

router = APIRouter()


@router.get("/healthz", responses=documented())
async def healthz(_q: NoQueryDep) -> dict[str, str]:
    """The process is up (answered on the event loop: a full thread pool does not fail it)."""
    return {"status": "ok"}


@router.get("/readyz", responses=documented())
def readyz(db: StoreDep, settings: SettingsDep, _q: NoQueryDep) -> JSONResponse:
    """The store answers and its schema is current; the broker and Redis accept connections."""
    try:
        db.ping()
        current = db.schema_is_current()
    except Exception as exc:
        return error(503, f"store unavailable: {describe(exc)}", {"Retry-After": "5"})
    if not current:
        return error(503, "store schema is not current: run `quarry db upgrade`")
    problem = broker_problem(settings) or redis_problem(settings)
    if problem is not None:
        return error(503, problem)
    return JSONResponse({"status": "ready"})
