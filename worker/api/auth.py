"""Who is asking: the bearer token (checked on every request), its scope, and the runs it
may see. ``operator`` may do everything; ``read`` only reads; ``gateway:NAME`` reads
and reports only on runs targeted at gateway NAME (any other run is a 404).

A console session (the ``quarry_session`` cookie, :mod:`worker.console`) stands for
the token it was exchanged for, so the console's own requests see exactly what
that token sees. A request that changes something with a cookie must carry the
session's CSRF secret in ``X-CSRF-Token``: a cookie alone proves nothing about who
made the request."""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Annotated, TypeVar

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from worker.errors import RunNotFound
from worker.models import Run
from worker.settings import Settings
from worker.store import Store
from worker.store.sessions import Session
from worker.store.tokens import Scope, Token

_bearer = HTTPBearer(auto_error=False)
_T = TypeVar("_T")

#: The console's session cookie.
SESSION_COOKIE = "quarry_session"
#: The header that carries a session's CSRF secret on a state-changing request.
CSRF_HEADER = "X-CSRF-Token"
#: Methods that change nothing, so a session cookie alone may make them.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def _store_of(request: Request) -> Store:
    return request.app.state.store  # type: ignore[no-any-return]


async def _store(request: Request) -> Store:
    # async: a plain attribute read, not worth a trip through the thread pool.
    return _store_of(request)


StoreDep = Annotated[Store, Depends(_store)]


async def _settings(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


SettingsDep = Annotated[Settings, Depends(_settings)]


async def _off_loop(store: Store, call: Callable[[str], _T], secret: str) -> _T:
    if store.dialect == "sqlite":
        # One indexed read of a local file, on the event loop: the trip through the thread
        # pool and back cost more than the read.
        return call(secret)
    return await run_in_threadpool(call, secret)  # a network round trip: off the loop


async def session_of(request: Request) -> Session | None:
    """The live console session this request's cookie opens, or None."""
    secret = request.cookies.get(SESSION_COOKIE)
    if not secret:
        return None
    store = _store_of(request)
    return await _off_loop(store, store.get_session, secret)


async def _authenticated(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Token:
    store = _store_of(request)
    if credentials is None:
        secret = request.cookies.get(SESSION_COOKIE)
        if not secret:
            raise HTTPException(401, "missing bearer token")
        session = await _off_loop(store, store.get_session, secret)
        if session is None:
            raise HTTPException(401, "the session has ended: sign in again")
        if request.method not in SAFE_METHODS and not hmac.compare_digest(
            request.headers.get(CSRF_HEADER, ""), session.csrf
        ):
            raise HTTPException(403, f"a change made with a session needs {CSRF_HEADER}")
        request.state.secret = secret
        request.state.still_authorised = lambda: store.get_session(secret) is not None
        return session.token
    token = await _off_loop(store, store.verify_token, credentials.credentials)
    if token is None:
        raise HTTPException(401, "invalid or revoked token")
    bearer = credentials.credentials
    request.state.secret = bearer
    request.state.still_authorised = lambda: store.verify_token(bearer) is not None
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
