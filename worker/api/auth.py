"""Who is asking: the bearer token (checked on every request), its scope, and the runs it
may see. ``operator`` may do everything; ``read`` only reads; ``gateway:NAME`` reads
and reports only on runs targeted at gateway NAME (any other run is a 404)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from worker.errors import RunNotFound
from worker.models import Run
from worker.settings import Settings
from worker.store import Store
from worker.store.tokens import Scope, Token

_bearer = HTTPBearer(auto_error=False)


def _store_of(request: Request) -> Store:
    return request.app.state.store  # type: ignore[no-any-return]


async def _store(request: Request) -> Store:
    # async: a plain attribute read, not worth a trip through the thread pool.
    return _store_of(request)


StoreDep = Annotated[Store, Depends(_store)]


async def _settings(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


SettingsDep = Annotated[Settings, Depends(_settings)]


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
    if token.scope != Scope.OPERATOR:
        raise HTTPException(
            403, f"this needs an operator token; this token's scope is {token.scope}"
        )
    return token


OperatorDep = Annotated[Token, Depends(_operator)]


def _reporter(token: TokenDep) -> Token:
    if token.scope == Scope.READ:
        raise HTTPException(403, "a read token cannot change runs")
    return token


ReporterDep = Annotated[Token, Depends(_reporter)]


def visible_run(db: Store, token: Token, run_id: str) -> Run:
    """The run, when this token may see it; a 404 otherwise (existence never leaks)."""
    try:
        run = db.get_run(run_id)
    except RunNotFound:
        raise HTTPException(404, f"no run {run_id}") from None
    if token.gateway is not None and run.gateway != token.gateway:
        raise HTTPException(404, f"no run {run_id}")
    return run
