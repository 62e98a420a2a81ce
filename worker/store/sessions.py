"""Console sessions: a signed-in browser holds a random secret in an HttpOnly cookie; the
store keeps its hash, the token it was exchanged for, its CSRF secret and its expiry.

A session lives only as long as its token: revoking the token ends every session made
from it (the lookup joins on a live token), and signing out deletes the row.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine, delete, insert, select

from worker.store.tables import api_tokens, console_sessions
from worker.store.tokens import Token, _token, _when, hash_secret

#: Prefix of a session secret, so the scrubber and a reader can tell one from a token.
SESSION_PREFIX = "qrs_"


@dataclass(frozen=True, slots=True)
class Session:
    """A live console session and the token it stands for."""

    id: str
    token: Token
    csrf: str
    expires_at: datetime


class SessionQueries:
    """The console-session half of the store interface (mixed into ``Store``)."""

    engine: Engine
    _reader: Engine

    def create_session(self, token: Token, ttl: timedelta) -> tuple[Session, str]:
        """A new session for ``token``; returns it and the cookie's secret (kept nowhere)."""
        secret = SESSION_PREFIX + secrets.token_urlsafe(32)
        now = datetime.now(UTC)
        session = Session(
            id=hash_secret(secret),
            token=token,
            csrf=secrets.token_urlsafe(32),
            expires_at=now + ttl,
        )
        with self.engine.begin() as conn:
            # Expired sessions go whenever a new one comes: the table stays as small as
            # the number of signed-in browsers.
            conn.execute(delete(console_sessions).where(console_sessions.c.expires_at < now))
            conn.execute(
                insert(console_sessions).values(
                    id=session.id,
                    token_id=token.id,
                    csrf=session.csrf,
                    created_at=now,
                    expires_at=session.expires_at,
                )
            )
        return session, secret

    def get_session(self, secret: str) -> Session | None:
        """The live session this cookie secret opens: unexpired, its token not revoked."""
        if not secret.startswith(SESSION_PREFIX) or len(secret) > 128:
            return None
        stmt = (
            select(
                console_sessions.c.id,
                console_sessions.c.csrf,
                console_sessions.c.expires_at,
                api_tokens.c.id.label("token_id"),
                api_tokens.c.name,
                api_tokens.c.scope,
                api_tokens.c.created_at,
            )
            .join(api_tokens, api_tokens.c.id == console_sessions.c.token_id)
            .where(
                console_sessions.c.id == hash_secret(secret),
                api_tokens.c.revoked_at.is_(None),
            )
        )
        with self._reader.connect() as conn:
            row = conn.execute(stmt).first()
        if row is None:
            return None
        expires_at = _when(row.expires_at)
        if expires_at is None or expires_at <= datetime.now(UTC):
            return None
        token = _token(row.token_id, row.name, row.scope, row.created_at, None)
        return Session(id=row.id, token=token, csrf=row.csrf, expires_at=expires_at)

    def end_session(self, secret: str) -> bool:
        """Sign out: the session is gone at once; False when it did not exist."""
        with self.engine.begin() as conn:
            result = conn.execute(
                delete(console_sessions).where(console_sessions.c.id == hash_secret(secret))
            )
            return bool(result.rowcount)
