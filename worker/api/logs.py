"""Logs: a run's pages, its live stream (Server-Sent Events), and the flat view across runs."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, HTTPException, Query, Request, Response
from sse_starlette.sse import EventSourceResponse
from starlette.concurrency import run_in_threadpool

from worker.api import stream
from worker.api.auth import StoreDep, TokenDep, visible_run
from worker.api.params import (
    ENTRY_CURSOR,
    FlatLogQuery,
    RunLogQuery,
    StreamQuery,
    as_utc,
    entry_cursor,
)
from worker.api.responses import documented, page_response
from worker.errors import RunNotFound
from worker.models import Level

#: Keep-alive comment interval on streams, seconds.
STREAM_PING_SECONDS = 15

router = APIRouter()


@router.get("/api/v1/action-runs/{run_id}/logs", responses=documented(401, 404))
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
            before_id=int(q.before) if q.before is not None else None,
            limit=q.limit,
            min_level=Level.parse(q.level) if q.level else None,
            event=q.event,
            since=as_utc(q.from_),
            until=as_utc(q.to),
        )
    except RunNotFound:
        raise HTTPException(404, f"no run {run_id}") from None
    return page_response(page, null_cursor=True)


@router.get("/api/v1/action-runs/{run_id}/logs/stream", responses=documented(401, 404))
async def run_stream(
    run_id: str,
    request: Request,
    *,
    db: StoreDep,
    token: TokenDep,
    q: Annotated[StreamQuery, Query()],
    last_event_id: Annotated[
        str | None, Header(alias="Last-Event-ID", pattern=ENTRY_CURSOR)
    ] = None,
) -> EventSourceResponse:
    """Server-Sent Events: each entry as it lands; resumes after ``Last-Event-ID``."""
    if db.dialect == "sqlite":
        visible_run(db, token, run_id)
    else:
        await run_in_threadpool(visible_run, db, token, run_id)
    events = stream.entry_events(
        request.app.state.feeds,
        run_id,
        after_id=entry_cursor(last_event_id or q.after),
        secret=request.state.secret,
        still_authorised=request.state.still_authorised,
    )
    return EventSourceResponse(events, ping=STREAM_PING_SECONDS)


@router.get("/api/v1/logs", responses=documented(401, 403))
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
        since=as_utc(q.from_),
        until=as_utc(q.to),
    )
    return page_response(page, null_cursor=False)
