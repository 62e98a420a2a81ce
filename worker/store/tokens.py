"""API tokens in the store: created once (the secret shown once), kept hashed, revocable."""

from __future__ import annotations

import enum
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, insert, select, update

from worker.store.engine import aware, fetch_one
from worker.store.tables import api_tokens

#: Prefix of every token secret, so scanners and the scrubber can recognise one.
TOKEN_PREFIX = "qry_"  # noqa: S105 - a prefix, not a secret


class Scope(enum.StrEnum):
    """What a token may do; a gateway token is ``gateway:NAME`` (:data:`GATEWAY_PREFIX`)."""

    OPERATOR = "operator"
    READ = "read"


#: A gateway token's scope is this prefix and the gateway's name.
GATEWAY_PREFIX = "gateway:"


def valid_scope(scope: str) -> bool:
    """Whether ``scope`` is ``operator``, ``read`` or ``gateway:NAME``."""
    return scope in set(Scope) or (
        scope.startswith(GATEWAY_PREFIX) and len(scope) > len(GATEWAY_PREFIX)
    )


@dataclass(frozen=True, slots=True)
class Token:
    """A stored token (never its secret)."""

    id: str
    name: str
    scope: str
    created_at: datetime
    revoked_at: datetime | None

    @property
    def gateway(self) -> str | None:
        """The gateway a ``gateway:NAME`` token is limited to."""
        return (
            self.scope.removeprefix(GATEWAY_PREFIX)
            if self.scope.startswith(GATEWAY_PREFIX)
            else None
        )


def hash_secret(secret: str) -> str:
    """SHA-256 of a token secret, hex."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def _when(value: datetime | str | None) -> datetime | None:
    """A stored time, aware UTC (SQLite's driver hands back SQLAlchemy's DateTime text)."""
    return aware(datetime.fromisoformat(value) if isinstance(value, str) else value)


def _token(
    token_id: str,
    name: str,
    scope: str,
    created_at: datetime | str | None,
    revoked_at: datetime | str | None,
) -> Token:
    """A token from its stored fields, as SQLAlchemy or the driver read them."""
    return Token(
        id=token_id,
        name=name,
        scope=scope,
        created_at=_when(created_at) or datetime.now(UTC),
        revoked_at=_when(revoked_at),
    )


def _token_of(row: Any) -> Token:
    return _token(row.id, row.name, row.scope, row.created_at, row.revoked_at)


_VERIFY_SQL = {
    dialect: "SELECT id, name, scope, token_hash, created_at, revoked_at "  # noqa: S608
    f"FROM api_tokens WHERE token_hash = {mark}"
    for dialect, mark in (("sqlite", "?"), ("postgresql", "%s"))
}


class TokenQueries:
    """The token half of the store interface (mixed into ``Store``)."""

    engine: Engine
    _reader: Engine
    dialect: str

    def create_token(self, scope: str, name: str = "") -> tuple[Token, str]:
        """Store a new token; returns it and its secret, which is kept nowhere."""
        secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
        token_id = f"tok_{secrets.token_hex(6)}"
        with self.engine.begin() as conn:
            conn.execute(
                insert(api_tokens).values(
                    id=token_id,
                    name=name or scope,
                    scope=scope,
                    token_hash=hash_secret(secret),
                    created_at=datetime.now(UTC),
                )
            )
        return self.get_token(token_id), secret

    def get_token(self, token_id: str) -> Token:
        """A token by id; raises KeyError."""
        with self._reader.connect() as conn:
            row = conn.execute(select(api_tokens).where(api_tokens.c.id == token_id)).first()
        if row is None:
            raise KeyError(token_id)
        return _token_of(row)

    def list_tokens(self) -> list[Token]:
        """Every token, newest first."""
        with self._reader.connect() as conn:
            rows = conn.execute(select(api_tokens).order_by(api_tokens.c.created_at.desc()))
            return [_token_of(row) for row in rows]

    def revoke_token(self, token_id: str) -> bool:
        """Revoke a token at once; False when it was unknown or already revoked."""
        with self.engine.begin() as conn:
            return bool(
                conn.execute(
                    update(api_tokens)
                    .where(api_tokens.c.id == token_id, api_tokens.c.revoked_at.is_(None))
                    .values(revoked_at=datetime.now(UTC))
                ).rowcount
            )

    def verify_token(self, secret: str) -> Token | None:
        """The live token whose secret this is, or None.

        Every API request asks, so the lookup goes to the driver directly:
        SQLAlchemy Core's statement handling took several times the read itself.
        """
        digest = hash_secret(secret)
        with self._reader.connect() as conn:
            row = fetch_one(conn, _VERIFY_SQL[self.dialect], (digest,))
        if row is None:
            return None
        token_id, name, scope, token_hash, created_at, revoked_at = row
        # The lookup is by hash; compare once more in constant time all the same.
        if revoked_at is not None or not hmac.compare_digest(token_hash, digest):
            return None
        return _token(token_id, name, scope, created_at, None)
