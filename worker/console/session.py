"""Who is looking at the console: the sign-in that exchanges an API token for a session
cookie, the checks every page and form makes, and sign-out.

- The cookie (``quarry_session``) is HttpOnly, SameSite=Strict, Secure when the page is
  served over TLS, and expires with the session (``QUARRY_CONSOLE_SESSION_HOURS``).
- The session stands for its token: same scope, same gateway. Revoking the token or
  signing out ends it at once, open live views included (streams re-check it).
- A form that changes something carries the session's CSRF secret, and a request from
  another origin is refused before it is read (``Origin`` / ``Sec-Fetch-Site``).
- A token is only ever accepted in a POST body: a ``token`` in a query string is refused.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from datetime import timedelta
from urllib.parse import quote, urlsplit

from fastapi import HTTPException, Request, Response
from starlette.concurrency import run_in_threadpool

from worker.api.auth import SESSION_COOKIE, session_of
from worker.store import Store
from worker.store.sessions import Session
from worker.store.tokens import Scope, Token


@dataclass(frozen=True, slots=True)
class Viewer:
    """A signed-in person: their session and what its token allows."""

    session: Session

    @property
    def token(self) -> Token:
        """The token the session was exchanged for."""
        return self.session.token

    @property
    def can_operate(self) -> bool:
        """Whether the page offers trigger and cancel."""
        return self.token.scope == Scope.OPERATOR

    @property
    def gateway(self) -> str | None:
        """The gateway a gateway token is limited to."""
        return self.token.gateway

    @property
    def csrf(self) -> str:
        """The secret every state-changing form echoes."""
        return self.session.csrf


class SignInRequired(Exception):
    """No live session: the page sends the browser to the sign-in form."""


def safe_next(target: str | None) -> str:
    """Where to go after signing in: a path on this site, never another origin."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/runs"
    parts = urlsplit(target)
    if parts.scheme or parts.netloc:
        return "/runs"
    return target


def sign_in_location(request: Request) -> str:
    """The sign-in form, with the page to come back to."""
    back = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return f"/signin?next={quote(back, safe='')}"


async def viewer(request: Request) -> Viewer:
    """The signed-in viewer (a dependency of every page); SignInRequired otherwise."""
    refuse_token_in_query(request)
    session = await session_of(request)
    if session is None:
        raise SignInRequired
    return Viewer(session)


def refuse_token_in_query(request: Request) -> None:
    """A token in a URL ends up in logs and histories: refused, never read."""
    if {"token", "access_token"} & set(request.query_params):
        raise HTTPException(400, "tokens in URLs are refused: sign in with the form")


def same_origin(request: Request) -> bool:
    """Whether the browser says this request comes from a page of this site.

    Browsers send ``Sec-Fetch-Site`` and ``Origin`` on every POST; a request with
    neither (a script, curl) has no ambient cookie to abuse and is let through to the
    CSRF check, which it cannot pass without the secret.
    """
    site = request.headers.get("sec-fetch-site")
    if site is not None and site not in {"same-origin", "none"}:
        return False
    origin = request.headers.get("origin")
    if origin is None or origin == "null":
        return origin is None
    here = f"{request.url.scheme}://{request.url.netloc}"
    return hmac.compare_digest(origin, here)


def check_form(request: Request, viewer_: Viewer, csrf: str) -> None:
    """A state-changing form: same origin and the session's CSRF secret, or 403."""
    if not same_origin(request):
        raise HTTPException(403, "cross-origin request refused")
    if not hmac.compare_digest(csrf, viewer_.csrf):
        raise HTTPException(403, "the form is stale or forged: reload the page and try again")


async def exchange(store: Store, secret: str, ttl: timedelta) -> tuple[Session, str] | None:
    """A new session for the token whose secret this is, or None when it is not live."""
    token = await run_in_threadpool(store.verify_token, secret.strip())
    if token is None:
        return None
    return await run_in_threadpool(store.create_session, token, ttl)


def set_cookie(request: Request, response: Response, secret: str, ttl: timedelta) -> None:
    """The session cookie: HttpOnly, SameSite=Strict, Secure over TLS, expiring."""
    response.set_cookie(
        SESSION_COOKIE,
        secret,
        max_age=int(ttl.total_seconds()),
        path="/",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )


def clear_cookie(request: Request, response: Response) -> None:
    """Remove the session cookie from the browser."""
    response.delete_cookie(
        SESSION_COOKIE,
        path="/",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
